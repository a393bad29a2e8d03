r"""`em`: expectation-maximisation with a posterior-sampling E-step (docs/design.md §2.10).

The prior p_θ is learned in laps. Lap k:

  E-step: one sample x_i ~ p_θ(x | y_i) for each of the first `em.num_observations`
    training observations, by a diffusion posterior sampler under the current
    prior (`flowdiff_jax.solvers`): "mmps", moment-matching posterior sampling
    (Rozet et al., NeurIPS 2024), or "dps", diffusion posterior sampling (the
    E-step of EMDiffusion, Bai et al., NeurIPS 2024);
  M-step: `em.steps_per_lap` updates of the score network by DSM on those
    samples (the generic `step.train_step`; the score network keeps training
    from lap to lap, it is not reset).

Lap 0 has no prior yet; its samples come from the warm start `em.warm_start`:
"gaussian_em" (Rozet et al.'s start: exact posterior samples under N(μ, Σ)
fitted by EM to the observations, section `gaussian_em`, kept frozen in
params["gaussian_em"]), "pinv" (A⁺y: lap 0 is the `naive` method) or "prior"
(the sampler under the freshly initialised network).

The E-step runs in chunks of `em.batch_size` observations, sharded over the
devices; each chunk's samples go to <workdir>/em/lap_<k>/chunk_<c>.npy as
soon as they exist. Before a lap's E-step the training program makes sure a
checkpoint of the lap's starting state exists, so a run stopped during an
E-step resumes with the same prior and recomputes only the missing chunks,
and a run stopped during an M-step reads its lap's samples back: either way
the result is bit-identical to an uninterrupted run. The M-step's batches
are a pure function of the step (a permutation of the lap's samples per
pass, seeded by (seed, lap, pass)), so no data-iterator state is needed.
Every lap's files are kept: a damaged newest checkpoint falls back to an
older step, whose lap then still has its samples. Several processes read and
write the same files: the workdir must be shared (a bucket or a shared disk).
"""

from __future__ import annotations

import time
from typing import Any

from absl import logging
from etils import epath
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from flowdiff_jax import configcheck, gaussian_em, operators, parallel, paths, solvers
from flowdiff_jax.methods import base, dsm

E_STEPS = ("mmps", "dps")
WARM_STARTS = ("gaussian_em", "pinv", "prior")
SAMPLE_WITH = ("ema", "params")
# The batch field of the M-step: the E-step's samples (never clean images).
SAMPLES_KEY = "x_sample"
# A stream of its own for the E-step's keys, apart from the training and init keys.
_E_STEP_STREAM = 0x454D


def make_solver(config: ml_collections.ConfigDict) -> solvers.Solver:
  """The E-step's posterior sampler from config.em."""
  em = config.em
  if em.e_step == "mmps":
    return solvers.MMPS(num_steps=int(em.num_steps), eta=float(em.eta),
                        cg_iters=int(em.cg_iters), clip=bool(em.clip))
  return solvers.DPS(zeta=float(em.dps_zeta), num_steps=int(em.num_steps), eta=float(em.eta),
                     clip=bool(em.clip))


def lap_keys(seed: int, lap: int, index: Any) -> jax.Array:
  """Per-observation E-step keys [B] of lap `lap`: the sample of observation i in lap k
  depends on (seed, k, i) only, not on the chunk or device it is drawn on."""
  root = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), _E_STEP_STREAM), lap)
  return jax.vmap(lambda i: jax.random.fold_in(root, i))(jnp.asarray(index, jnp.int32))


def e_step(solver: solvers.Solver, obj: base.Objective, score_params: Any, y: jax.Array,
           omega: operators.Omega, keys: jax.Array) -> jax.Array:
  """One posterior sample [B, H, W, C] per observation y [B, H, W, C] under the score network.

  Pure and jittable (`solvers.solve` with the run's ε-network); keys [B] from `lap_keys`.
  """
  return solvers.solve(solver, base.eps_fn(obj, score_params), obj.schedule, obj.operator, y,
                       omega, keys)


def _gaussian_warm_start(config: ml_collections.ConfigDict) -> bool:
  return config.em.warm_start == "gaussian_em"


class EM(dsm.DenoisingScoreMatching):
  """Params {"score"} (+ the frozen {"gaussian_em"} fit); the M-step is DSM on batch["x_sample"]."""
  name = "em"

  def validate(self, config: ml_collections.ConfigDict) -> None:
    configcheck.choice(config, "em.e_step", E_STEPS)
    configcheck.choice(config, "em.warm_start", WARM_STARTS)
    configcheck.choice(config, "em.sample_with", SAMPLE_WITH)
    for field in ("steps_per_lap", "batch_size", "num_steps"):
      configcheck.positive(config, f"em.{field}", integer=True)
    configcheck.positive(config, "em.num_observations", strict=False, integer=True)
    configcheck.positive(config, "em.cg_iters", strict=False, integer=True)
    configcheck.positive(config, "em.dps_zeta")
    if not 0.0 <= float(config.em.eta) <= 1.0:
      configcheck.fail("em.eta", config.em.eta, "must be in [0, 1] (1: DDPM, 0: DDIM)")
    if not isinstance(config.em.clip, bool):
      configcheck.fail("em.clip", config.em.clip, "must be True or False")
    per_dispatch = int(config.training.get("steps_per_dispatch", 1))
    if config.em.steps_per_lap % per_dispatch:
      configcheck.fail("em.steps_per_lap", config.em.steps_per_lap,
                       f"must be a multiple of training.steps_per_dispatch={per_dispatch} (a "
                       "dispatch may not cross a lap, whose E-step comes first)")
    if _gaussian_warm_start(config):
      op = operators.make_operator(config.operator)
      if not op.sigma_y > 0:
        configcheck.fail("operator.sigma_y", op.sigma_y, "em.warm_start='gaussian_em' needs "
                         "σ_y > 0")
      rank = config.gaussian_em.rank
      if not isinstance(rank, int) or rank < 0:
        configcheck.fail("gaussian_em.rank", rank, "must be an integer >= 0 (0: a dense Σ)")
      for field in ("num_iters", "batch_size"):
        configcheck.positive(config, f"gaussian_em.{field}", integer=True)
      configcheck.positive(config, "gaussian_em.init_var")

  def training_images(self, obj, batch) -> jax.Array:
    return batch[SAMPLES_KEY]

  def init_params(self, obj, config, rng, batch, prior_params=None,
                  fitted_params=None) -> dict[str, Any]:
    return {"score": base.init_score(obj, rng, base.images_shape(batch)),
            **(fitted_params or {})}

  def optimizer(self, config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    frozen = {base.GAUSSIAN_KEY: optax.set_to_zero()} if _gaussian_warm_start(config) else {}
    return base.partitioned({"score": base.make_optimizer(config.optim), **frozen})

  def fitted_params_shapes(self, config, image_shape):
    if not _gaussian_warm_start(config):
      return None
    return {base.GAUSSIAN_KEY: gaussian_em.prior_shapes(
        image_shape, int(config.gaussian_em.rank) or None)}

  def fit_params(self, config, observations, mesh=None):
    if not _gaussian_warm_start(config):
      return None
    gem = config.gaussian_em
    op = operators.make_operator(config.operator)
    y, omega = observations(int(gem.max_examples))
    fit = gaussian_em.fit(op, y, omega, num_iters=int(gem.num_iters),
                          rank=int(gem.rank) or None, init_var=float(gem.init_var),
                          batch_size=int(gem.batch_size), mesh=mesh, seed=int(config.seed))
    return {base.GAUSSIAN_KEY: gaussian_em.prior_params(fit)}

  def batch_source(self, config, run_data, mesh, workdir) -> Laps:
    return Laps(config, run_data, mesh, workdir)


EM_METHOD = EM()


def _as_global(array: np.ndarray, sharding: jax.sharding.Sharding) -> jax.Array:
  """A host array (the same on every process) as a global array of `sharding`."""
  return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])


class Laps:
  """The E-step's samples of every lap (files under <workdir>/em) and the M-step's batches.

  The training program asks `needs_e_step(step)` before each dispatch, runs
  `e_step(state, step, should_stop)` when it is true, and takes each update's
  batch from `batch(step)`.
  """

  def __init__(self, config: ml_collections.ConfigDict, run_data, mesh: jax.sharding.Mesh,
               workdir: str):
    em = config.em
    self.config, self.mesh = config, mesh
    self.directory = paths.resolve(workdir) / "em"
    self.steps_per_lap = int(em.steps_per_lap)
    self.chunk = int(em.batch_size)
    self.batch_size = int(config.training.batch_size)
    if self.chunk % mesh.size:
      configcheck.fail("em.batch_size", self.chunk,
                       f"does not split over the mesh's {mesh.size} devices; allowed: "
                       f"multiples of {mesh.size}")
    y, omega = run_data.observations(int(em.num_observations))
    self.y, self.omega = np.asarray(y), jax.tree.map(np.asarray, omega)
    self.num = self.y.shape[0]
    self.num_chunks = -(-self.num // self.chunk)
    self.op = operators.make_operator(config.operator)
    self.solver = make_solver(config)
    self._bank: tuple[int, np.ndarray] | None = None  # (lap, samples [N, H, W, C])
    self._perms: dict[tuple[int, int], np.ndarray] = {}
    self._data = parallel.batch_sharding(mesh)
    rep = parallel.replicated(mesh)

    seed = int(config.seed)

    def solve(obj, params, y, omega, index, lap):
      # The keys are made inside: typed key arrays need not be placed on devices.
      return e_step(self.solver, obj, params, y, omega, lap_keys(seed, lap, index))
    self._solve = jax.jit(solve, static_argnums=0,
                          in_shardings=(rep, self._data, self._data, self._data, rep),
                          out_shardings=self._data)
    self._pinv = jax.jit(self.op.pinv, out_shardings=self._data)

  # -- where the samples live ------------------------------------------------

  def lap(self, step: int) -> int:
    """The lap of the update that takes the state from `step` to step + 1."""
    return step // self.steps_per_lap

  def _path(self, lap: int, chunk: int) -> epath.Path:
    return self.directory / f"lap_{lap:05d}" / f"chunk_{chunk:05d}.npy"

  def _missing(self, lap: int) -> list[int]:
    return [c for c in range(self.num_chunks) if not self._path(lap, c).exists()]

  def _load(self, lap: int) -> None:
    parts = [paths.load_npy(self._path(lap, c)) for c in range(self.num_chunks)]
    self._bank = (lap, np.concatenate(parts)[:self.num])

  def needs_e_step(self, step: int) -> bool:
    """Whether lap(step)'s samples are still to be drawn (else they are loaded, once)."""
    lap = self.lap(step)
    if self._bank is not None and self._bank[0] == lap:
      return False
    if self._missing(lap):
      if step % self.steps_per_lap:
        raise FileNotFoundError(
            f"Step {step} is inside lap {lap} of the EM run, but that lap's E-step samples "
            f"are not all in {self._path(lap, 0).parent} (missing chunks "
            f"{self._missing(lap)[:5]}...): they were deleted, or the workdir is not shared "
            "between the processes. Restore the folder, or start the run in a new workdir.")
      return True
    self._load(lap)
    return False

  # -- the E-step --------------------------------------------------------------

  def _chunk_samples(self, state, lap: int, chunk: int) -> np.ndarray:
    start = chunk * self.chunk
    # The last chunk is padded with the last observation (its samples are dropped).
    index = np.minimum(np.arange(start, start + self.chunk), self.num - 1)
    y = self.y[index]
    omega = jax.tree.map(lambda a: a[index], self.omega)
    warm = self.config.em.warm_start
    if lap == 0 and warm == "gaussian_em":
      fit = gaussian_em.prior_from_params(jax.device_get(state.params[base.GAUSSIAN_KEY]),
                                          self.y.shape[1:])
      # One key per chunk: Matheron's rule draws the chunk's prior samples together.
      x = gaussian_em.posterior_sample(fit, self.op, jnp.asarray(y), omega,
                                       lap_keys(self.config.seed, lap, index[:1])[0])
    elif lap == 0 and warm == "pinv":
      x = self._pinv(_as_global(y, self._data), jax.tree.map(
          lambda a: _as_global(a, self._data), omega))
    else:
      params = (state.ema_params if self.config.em.sample_with == "ema" else state.params)
      x = self._solve(state.objective, params["score"], _as_global(y, self._data),
                      jax.tree.map(lambda a: _as_global(a, self._data), omega),
                      _as_global(index.astype(np.int32), self._data), np.int32(lap))
    x = np.asarray(multihost_utils.process_allgather(x, tiled=True), np.float32)
    return x[:min(self.chunk, self.num - start)]

  def e_step(self, state, step: int, should_stop) -> dict[str, float] | None:
    """Draws lap(step)'s missing chunks with the state's prior; None if stopped in between.

    should_stop: () -> bool, asked after every chunk (every process the same
    number of times); the chunks written so far stay and are not redrawn.
    Returns the lap's E-step metrics: its wall time, images/s and the samples'
    data consistency ‖y − A x‖² / (m σ_y²) (`operators.residual_ratio`; ≈ 1
    for samples of the exact posterior).
    """
    lap = self.lap(step)
    missing = self._missing(lap)
    start = time.time()
    for done, chunk in enumerate(missing, start=1):
      x = self._chunk_samples(state, lap, chunk)
      if jax.process_index() == 0:
        paths.save_npy(self._path(lap, chunk), x)  # a chunk file is complete or absent
      multihost_utils.sync_global_devices(f"em lap {lap} chunk {chunk}")
      if done < len(missing) and should_stop():
        logging.warning("Stopped during the E-step of lap %d: %d of %d chunks are in %s.",
                        lap, self.num_chunks - len(missing) + done, self.num_chunks,
                        self._path(lap, 0).parent)
        return None
    seconds = time.time() - start
    self._load(lap)
    ratio = float(np.mean(operators.residual_ratio(
        self.op, jnp.asarray(self.y), jax.tree.map(jnp.asarray, self.omega),
        jnp.asarray(self._bank[1]))))
    source = ("warm start " + self.config.em.warm_start if lap == 0 and
              self.config.em.warm_start != "prior" else self.config.em.e_step)
    logging.info("EM lap %d: E-step (%s) drew %d posterior samples in %.1f s (%.1f images/s); "
                 "their residual ratio is %.3f.", lap, source, len(missing) * self.chunk,
                 seconds, len(missing) * self.chunk / max(seconds, 1e-9), ratio)
    return {"em/lap": float(lap), "em/e_step_seconds": seconds,
            "em/e_step_images_per_second": len(missing) * self.chunk / max(seconds, 1e-9),
            "em/residual_ratio": ratio}

  # -- the M-step's batches ----------------------------------------------------

  def _perm(self, lap: int, epoch: int) -> np.ndarray:
    key = (lap, epoch)
    if key not in self._perms:
      self._perms = {k: v for k, v in self._perms.items() if k[0] == lap}
      self._perms[key] = np.random.default_rng(
          [int(self.config.data.shuffle_seed), lap, epoch]).permutation(self.num)
    return self._perms[key]

  def batch(self, step: int) -> dict[str, jax.Array]:
    """{"x_sample": [B, H, W, C]} of the update step -> step + 1, sharded over the mesh.

    A pure function of the step: passes over the lap's samples in a fresh
    permutation each, the batches running on across the passes.
    """
    lap = self.lap(step)
    assert self._bank is not None and self._bank[0] == lap, "needs_e_step(step) first"
    pos = (step - lap * self.steps_per_lap) * self.batch_size + np.arange(self.batch_size)
    epoch, within = np.divmod(pos, self.num)
    index = np.array([self._perm(lap, int(e))[w] for e, w in zip(epoch, within)])
    return {SAMPLES_KEY: _as_global(self._bank[1][index], self._data)}
