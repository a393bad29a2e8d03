r"""Downstream inverse problems with a learned diffusion prior (DESIGN 2.7).

Given a trained ε-network ε̂(x_t, t) of a VP diffusion (`diffusion.py`) and a
measurement y = A_ω x + σ_y ε of an operator of `operators.py` (σ_y on the
[-1, 1] image scale, DESIGN 2, as in DPS), the solvers here draw an
approximate posterior sample x ~ p(x | y) by running the reverse process from
t = 1 to 0 with a likelihood-guidance term. Both share the time grid of
`diffusion.sample` (num_steps steps uniform in t from 1 to t_min), followed by
one last step t_min -> 0 that returns the (guided) estimate of x₀, so a solve
costs num_steps + 1 forward *and* backward passes of the network.

Notation: x̂₀(x_t) = (x_t − σ_t ε̂(x_t, t)) / α_t is Tweedie's estimate of
E[x₀ | x_t], and a DDIM(η) step from t to s < t with (x̂₀, ε̂) is

    x_s = α_s x̂₀ + sqrt(σ_s² − c_η²) ε̂ + c_η z,   c_η = η σ_s sqrt(1 − SNR_t/SNR_s),

z ~ N(0, I): η = 1 is the DDPM ancestral step of `diffusion.sample`, η = 0 is
DDIM. With `clip`, x̂₀ is clipped to [-1, 1] inside the step (ε̂ recomputed to
match, as in `diffusion.sample`) and the result is clipped.

**DPS** (Chung, Kim, Mccann, Klasky, Ye, ICLR 2023; any operator):

    x'_s = DDIM_η(x_t; x̂₀, ε̂)
    x_s  = x'_s − ζ / ‖y − A x̂₀‖ · ∇_{x_t} ½‖y − A x̂₀‖²   (= x'_s − ζ ∇_{x_t} ‖y − A x̂₀‖)

per example, the gradient taken through the network. ζ is the step size of
the official DPS code's `scale` (the paper's ζ' with ∇‖·‖² is ζ/2). The rule
normalises the step by the residual, so σ_y enters only through y; ζ needs
tuning per task and image size (`TASKS` holds the CLI's defaults).

**ΠGDM** (Song, Vahdat, Mardani, Kautz, ICLR 2023; linear operators, using
their structure): it approximates p(x₀ | x_t) by N(x̂₀, r_t² I), with

    r_t² = v σ_t² / (α_t² v + σ_t²),

the variance of x₀ | x_t when x₀ ~ N(μ, v I) (v = `data_var`; the paper's
v = 1 gives r_t² = σ_t² on the VP scale). Then p(y | x_t) ≈ N(A x̂₀, r_t² A Aᵀ
+ σ_y² I) and the likelihood score is the vector-Jacobian product

    g = (∂x̂₀/∂x_t)ᵀ Aᵀ (r_t² A Aᵀ + σ_y² I)⁻¹ (y − A x̂₀).

The inverse is exact and cheap because A Aᵀ is diagonal for our operators:
I (denoising), diag(mask) (inpainting), and |H(f)|² in the 2-D DFT basis for
the circular blur. We use g as a conditional score, ε̂_y = ε̂ − σ_t g, i.e. the
guided estimate x̂₀_y = x̂₀ + (σ_t² / α_t) g, in the DDIM(η) step (the paper's
Algorithm 1 adds a heuristically weighted g to the unguided update instead).
This form is the exact posterior score when the prior is N(μ, v I), so then
the solver samples the exact posterior up to time discretisation
(tests/test_inverse.py checks the closed-form mean and covariance); for other
priors it is ΠGDM's approximation.

Randomness is per example: example i's x_1 and every step's z derive from its
own key (`example_keys(seed, index)`), so its solution does not depend on the
batch it is solved in. `solve` is pure and jittable (one `lax.scan`);
`solve_chunked` runs the same steps as jitted chunks from a host loop, which
syncs once per chunk to report progress.

CLI (restores a trained prior, corrupts held-out test images, solves, scores):

    python -m flowdiff_jax.inverse --workdir=RUN --task=inpaint|denoise|deblur \
        [--num_images=64] [--solvers=dps,pigdm] [--output_dir=RUN/inverse/TASK]

writes metrics.json, metrics.md and grid.png (rows: observation | one column per
solver | clean). `--collect=DIR` gathers every metrics.json under DIR into
one comparison table.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import json
import math
import os
import platform
import sys
import time
from typing import Any, Callable, ClassVar, Union

import jax
import jax.numpy as jnp
import numpy as np

from flowdiff_jax import diffusion, operators

EpsFn = Callable[[jax.Array, jax.Array], jax.Array]
# (params, x_t [B, H, W, C], t [B]) -> ε̂; must be hashable (a jit-static argument).
EpsApply = Callable[[Any, jax.Array, jax.Array], jax.Array]


# --------------------------------------------------------------------------
# Tasks: the corruptions of the Fashion-MNIST / CIFAR / CelebA protocols.
# --------------------------------------------------------------------------

# The operator of each task: those of configs/fmnist_inpaint.py, fmnist_noise.py
# and fmnist_blur.py (tests/test_inverse.py checks they agree), σ_y on the
# [-1, 1] scale. `dps_zeta` is the CLI's default DPS step size for the task
# (1000 steps, 28×28 images): the best of ζ ∈ {0.1, 0.3, 1, 3} on Fashion-MNIST
# test images 1000–1003 (outside the experiment table's) with a clean prior,
# PSNR inpaint 18.1 / 18.8 / 18.2 / –, denoise 23.6 / 24.4 / 22.0 / –,
# deblur – / 17.5 / 18.1 / 15.9 dB (experiments/inverse/README.md).
TASKS = {
    "inpaint": dict(operator=dict(name="inpaint_random", drop_prob=0.6, sigma_y=0.01),
                    dps_zeta=0.3),
    "denoise": dict(operator=dict(name="denoise", sigma_y=0.2), dps_zeta=0.3),
    "deblur": dict(operator=dict(name="blur", kernel_size=9, kernel_std=2.0, sigma_y=0.02),
                   dps_zeta=1.0),
}
# The config file whose `operator` each task reproduces.
TASK_CONFIGS = {"inpaint": "fmnist_inpaint", "denoise": "fmnist_noise", "deblur": "fmnist_blur"}

# Seed of the test images' corruption (mask, noise), fixed so that every prior
# and solver sees the same observations: image i of the test split gets
# operators.corrupt(op, x, index=i, seed=CORRUPTION_SEED).
CORRUPTION_SEED = 0


def task_operator(task: str, sigma_y: float | None = None) -> operators.Operator:
  """The forward operator of `task` (a key of TASKS), optionally with another σ_y."""
  if task not in TASKS:
    raise ValueError(f"task={task!r}: unknown task; allowed: {', '.join(TASKS)}")
  cfg = dict(TASKS[task]["operator"])
  if sigma_y is not None:
    cfg["sigma_y"] = float(sigma_y)
  return operators.make_operator(cfg)


# --------------------------------------------------------------------------
# Solvers.
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DPS:
  """Diffusion posterior sampling (see the module docstring). Hashable: jit-static."""

  # Step size ζ of x_s = x'_s − ζ ∇_{x_t} ‖y − A x̂₀‖. 1 is the DPS code's value
  # for 256×256 images; smaller images want other values (TASKS, for 28×28).
  zeta: float = 1.0
  num_steps: int = 1000  # steps on the grid (+1 final step), the paper's 1000
  eta: float = 1.0  # 1: DDPM ancestral steps (the paper), 0: DDIM
  clip: bool = True  # clip x̂₀ in the steps and the result to [-1, 1]
  name: ClassVar[str] = "dps"


@dataclasses.dataclass(frozen=True)
class PiGDM:
  """Pseudo-inverse guided diffusion for linear operators (see the module docstring)."""

  num_steps: int = 100  # steps on the grid (+1 final step), the paper's 100
  eta: float = 1.0  # 1: DDPM ancestral steps, 0: DDIM
  data_var: float = 1.0  # v in r_t² = v σ_t² / (α_t² v + σ_t²); the paper's 1
  clip: bool = True  # clip the guided x̂₀ in the steps and the result to [-1, 1]
  name: ClassVar[str] = "pigdm"


Solver = Union[DPS, PiGDM]
SOLVERS = {cls.name: cls for cls in (DPS, PiGDM)}


def time_grid(schedule: diffusion.VPSchedule, num_steps: int) -> tuple[np.ndarray, np.ndarray]:
  """(t, s) of the num_steps + 1 transitions: `diffusion.sample`'s grid 1 -> t_min, then t_min -> 0.

  Returns two float32 arrays [num_steps + 1]; s = 0 marks the final step
  (λ(0) = +inf: α = 1, σ = 0, so the DDIM step returns x̂₀).
  """
  if num_steps < 1:
    raise ValueError(f"num_steps must be >= 1, got {num_steps}")
  grid = np.concatenate([np.linspace(1.0, schedule.t_min, num_steps + 1), [0.0]])
  return grid[:-1].astype(np.float32), grid[1:].astype(np.float32)


def example_keys(seed: int, index: Any) -> jax.Array:
  """Per-example solver keys [B]: fold_in(key(seed), index[i])."""
  root = jax.random.key(seed)
  return jax.vmap(lambda i: jax.random.fold_in(root, i))(jnp.asarray(index, jnp.int32))


def _bcast(v: jax.Array, x: jax.Array) -> jax.Array:
  return jnp.reshape(v, v.shape + (1,) * (x.ndim - v.ndim))


def _tweedie(eps_fn: EpsFn, schedule: diffusion.VPSchedule, x: jax.Array,
             t: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(x̂₀, ε̂) at x_t = x [B, H, W, C] and scalar time t."""
  alpha, sigma = schedule.alpha_sigma(t)
  eps = eps_fn(x, jnp.full((x.shape[0],), t, jnp.float32)).astype(jnp.float32)
  return (x - sigma * eps) / alpha, eps


def _ddim_step(schedule: diffusion.VPSchedule, x: jax.Array, x0: jax.Array, t: jax.Array,
               s: jax.Array, eta: float, clip: bool, noise: jax.Array) -> jax.Array:
  """DDIM(η) step x_t -> x_s given the (possibly guided) estimate x0 [B, H, W, C]."""
  lam_t, lam_s = schedule.log_snr(t), schedule.log_snr(s)
  alpha_t, sigma_t = schedule.alpha_sigma(t)
  alpha_s, sigma_s = schedule.alpha_sigma(s)
  if clip:
    x0 = jnp.clip(x0, -1.0, 1.0)
  eps = (x - alpha_t * x0) / sigma_t  # the ε consistent with x0 (ε̂ itself when unclipped)
  # 1 − SNR_t/SNR_s via expm1 (small steps); 1 at the final step (λ_s = inf).
  c = -jnp.expm1(lam_t - lam_s)
  std = eta * sigma_s * jnp.sqrt(c)
  return alpha_s * x0 + jnp.sqrt(jnp.maximum(sigma_s**2 - std**2, 0.0)) * eps + std * noise


def inverse_measurement_cov(op: operators.Operator, r2: jax.Array, v: jax.Array,
                            omega: operators.Omega) -> jax.Array:
  """(r2 A Aᵀ + σ_y² I)⁻¹ v for v [B, H, W, C] in measurement space, r2 a scalar.

  Uses the structure of A Aᵀ: I (denoising), diag(mask) (inpainting; the
  result is 0 on dropped pixels, where v is 0 anyway), and |H(f)|² in the
  2-D DFT basis for the circular blur. Raises NotImplementedError otherwise.
  """
  sy2 = op.sigma_y**2
  if isinstance(op, operators.Denoise):
    return v / (r2 + sy2)
  if isinstance(op, (operators.RandomInpaint, operators.BoxInpaint)):
    mask = omega["mask"].astype(v.dtype)
    # On dropped pixels the denominator is σ_y², 0 when noiseless: keep it finite.
    return jnp.where(mask > 0, v / jnp.where(mask > 0, r2 * mask + sy2, 1.0), 0.0)
  if isinstance(op, operators.GaussianBlur):
    height, width = v.shape[1], v.shape[2]
    # |H|² computed in float64 on the host: static, so free under jit.
    power = jnp.asarray(np.abs(op.transfer(height, width))**2, jnp.float32)
    vf = jnp.fft.rfft2(v, axes=(1, 2))
    u = jnp.fft.irfft2(vf / (r2 * power + sy2)[None, :, :, None], s=(height, width), axes=(1, 2))
    return u.astype(v.dtype)
  raise NotImplementedError(
      f"ΠGDM needs the structure of A Aᵀ; not implemented for operator {op.name!r}.")


def _dps_step(solver: DPS, eps_fn: EpsFn, schedule: diffusion.VPSchedule,
              op: operators.Operator, y: jax.Array, omega: operators.Omega, x: jax.Array,
              t: jax.Array, s: jax.Array, noise: jax.Array) -> jax.Array:
  def half_sq_residual(x):
    x0, eps = _tweedie(eps_fn, schedule, x, t)
    r = y - op.apply(x0, omega)
    # Summed over the batch: examples are independent, so the gradient is per example.
    return 0.5 * jnp.sum(jnp.square(r)), (x0, r)

  grad, (x0, r) = jax.grad(half_sq_residual, has_aux=True)(x)
  norm = jnp.sqrt(jnp.sum(jnp.square(r), axis=tuple(range(1, r.ndim))))
  x_prime = _ddim_step(schedule, x, x0, t, s, solver.eta, solver.clip, noise)
  # ζ/‖r‖ ∇½‖r‖² = ζ ∇‖r‖, but finite when r = 0 (noiseless, perfectly fit data).
  return x_prime - _bcast(solver.zeta / jnp.maximum(norm, 1e-12), x) * grad


def pigdm_guidance(solver: PiGDM, eps_fn: EpsFn, schedule: diffusion.VPSchedule,
                   op: operators.Operator, y: jax.Array, omega: operators.Omega, x: jax.Array,
                   t: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(x̂₀, guided x̂₀_y = x̂₀ + σ_t²/α_t g) at x_t = x [B, H, W, C], scalar t (no clipping)."""
  alpha, sigma = schedule.alpha_sigma(t)
  x0, vjp_fn = jax.vjp(lambda x: _tweedie(eps_fn, schedule, x, t)[0], x)
  v = solver.data_var
  r2 = v * sigma**2 / (alpha**2 * v + sigma**2)
  u = inverse_measurement_cov(op, r2, y - op.apply(x0, omega), omega)
  (g,) = vjp_fn(op.adjoint(u, omega))
  return x0, x0 + (sigma**2 / alpha) * g


def _pigdm_step(solver: PiGDM, eps_fn: EpsFn, schedule: diffusion.VPSchedule,
                op: operators.Operator, y: jax.Array, omega: operators.Omega, x: jax.Array,
                t: jax.Array, s: jax.Array, noise: jax.Array) -> jax.Array:
  _, x0_y = pigdm_guidance(solver, eps_fn, schedule, op, y, omega, x, t)
  return _ddim_step(schedule, x, x0_y, t, s, solver.eta, solver.clip, noise)


_STEPS = {"dps": _dps_step, "pigdm": _pigdm_step}


def _init(keys: jax.Array, shape: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
  """(x_1 ~ N(0, I) of `shape` [B, ...], per-example step keys [B]) from keys [B]."""
  split = jax.vmap(jax.random.split)(keys)  # [B, 2]
  init_keys, step_keys = split[:, 0], split[:, 1]
  x = jax.vmap(lambda k: jax.random.normal(k, shape[1:], jnp.float32))(init_keys)
  return x, step_keys


def _run_steps(solver: Solver, eps_fn: EpsFn, schedule: diffusion.VPSchedule,
               op: operators.Operator, y: jax.Array, omega: operators.Omega, x: jax.Array,
               step_keys: jax.Array, index: jax.Array, t: jax.Array, s: jax.Array,
               valid: jax.Array) -> jax.Array:
  """Scans the transitions (index, t, s, valid) [n] from x [B, H, W, C]; invalid ones are no-ops."""
  step = functools.partial(_STEPS[solver.name], solver, eps_fn, schedule, op, y, omega)

  def body(x, inputs):
    n, t, s, ok = inputs
    if solver.eta == 0:  # deterministic steps: skip the (costly) noise draws
      noise = jnp.zeros_like(x)
    else:
      noise = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, n), x.shape[1:],
                                                   jnp.float32))(step_keys)
    # Padding steps (the last chunk of solve_chunked) skip the network entirely.
    return jax.lax.cond(ok, lambda x: step(x, t, s, noise), lambda x: x, x), None

  x, _ = jax.lax.scan(body, x, (index, t, s, valid))
  return x


def solve(solver: Solver, eps_fn: EpsFn, schedule: diffusion.VPSchedule,
          op: operators.Operator, y: jax.Array, omega: operators.Omega,
          keys: jax.Array) -> jax.Array:
  """Posterior samples x [B, H, W, C] for measurements y [B, H, W, C]; pure, jittable.

  Args:
    solver: a DPS or PiGDM (static).
    eps_fn: (x_t [B, H, W, C], t [B]) -> ε̂. To jit, close over traced params,
      e.g. ``jax.jit(lambda p, y, w, k: solve(solver, lambda x, t: net.apply(p, x,
      t), schedule, op, y, w, k))``.
    schedule: the prior's VP schedule (static).
    op: the forward operator (static); its sigma_y is on the [-1, 1] scale.
    y: measurements [B, H, W, C].
    omega: the operator's per-example parameters, leaves [B, ...].
    keys: per-example keys [B] (`example_keys`).
  Returns:
    Samples [B, H, W, C] (float32; in [-1, 1] when solver.clip).
  """
  t, s = time_grid(schedule, solver.num_steps)
  x, step_keys = _init(keys, y.shape)
  x = _run_steps(solver, eps_fn, schedule, op, y, omega, x, step_keys,
                 jnp.arange(t.size, dtype=jnp.int32), jnp.asarray(t), jnp.asarray(s),
                 jnp.ones(t.shape, bool))
  return jnp.clip(x, -1.0, 1.0) if solver.clip else x


_init_jit = jax.jit(_init, static_argnums=1)


@functools.partial(jax.jit, static_argnames=("solver", "eps_apply", "schedule", "op"))
def _solve_chunk(params, y, omega, x, step_keys, index, t, s, valid, *, solver, eps_apply,
                 schedule, op):
  eps_fn = lambda x_t, tt: eps_apply(params, x_t, tt)  # noqa: E731
  return _run_steps(solver, eps_fn, schedule, op, y, omega, x, step_keys, index, t, s, valid)


class ProgressBar:
  """A text progress line on stderr: redrawn in place on a terminal, a line per update elsewhere."""

  def __init__(self, label: str, total: int, stream=None, width: int = 30):
    self.label, self.total, self.width = label, total, width
    self.stream = sys.stderr if stream is None else stream
    self.start = time.time()
    self.tty = getattr(self.stream, "isatty", lambda: False)()

  def __call__(self, done: int) -> None:
    elapsed = time.time() - self.start
    frac = done / max(self.total, 1)
    eta = elapsed / frac - elapsed if frac > 0 else float("nan")
    bar = "#" * int(round(frac * self.width))
    line = (f"{self.label} [{bar:<{self.width}}] {done}/{self.total} steps, "
            f"{elapsed:.0f} s, eta {eta:.0f} s")
    end = "\n" if (not self.tty or done >= self.total) else ""
    self.stream.write(("\r" if self.tty else "") + line + end)
    self.stream.flush()


def solve_chunked(solver: Solver, eps_apply: EpsApply, params: Any,
                  schedule: diffusion.VPSchedule, op: operators.Operator, y: jax.Array,
                  omega: operators.Omega, keys: jax.Array, *, num_chunks: int = 20,
                  progress: Callable[[int], None] | None = None) -> jax.Array:
  """`solve` run as `num_chunks` jitted chunks of steps from a host loop; same draws, same result.

  Args:
    eps_apply: (params, x_t, t) -> ε̂, hashable (e.g. `NetworkEps`); jit-static,
      so pass the same object for every batch to compile once.
    params: the network's params (traced, not baked into the program).
    num_chunks: how many times the host syncs to report progress. All chunks
      have the same length (the last is padded with no-op steps), so the
      chunk program compiles once.
    progress: called with the number of steps done after each chunk (e.g. a
      `ProgressBar`); None: no host syncs until the caller reads the result.
  Other arguments as in `solve`.
  """
  t, s = time_grid(schedule, solver.num_steps)
  total = t.size
  chunk = math.ceil(total / max(1, min(num_chunks, total)))
  padded = math.ceil(total / chunk) * chunk
  pad = lambda a, v: np.concatenate([a, np.full(padded - total, v, a.dtype)])  # noqa: E731
  index = pad(np.arange(total, dtype=np.int32), 0)
  t, s, valid = pad(t, 1.0), pad(s, 1.0), pad(np.ones(total, bool), False)
  x, step_keys = _init_jit(keys, y.shape)
  run = functools.partial(_solve_chunk, solver=solver, eps_apply=eps_apply, schedule=schedule,
                          op=op)
  for start in range(0, padded, chunk):
    sl = slice(start, start + chunk)
    x = run(params, y, omega, x, step_keys, index[sl], t[sl], s[sl], valid[sl])
    if progress is not None:
      jax.block_until_ready(x)  # the one host sync per chunk
      progress(min(start + chunk, total))
  return jnp.clip(x, -1.0, 1.0) if solver.clip else x


@dataclasses.dataclass(frozen=True)
class NetworkEps:
  """eps_apply of a trained run: (params, x_t, t) -> ε̂ of `objective.score_net`, eval mode.

  A frozen dataclass of the (hashable) train_step.Objective, so equal for the
  same run: a jit-static argument that compiles once.
  """

  objective: Any

  def __call__(self, params: Any, x_t: jax.Array, t: jax.Array) -> jax.Array:
    return self.objective.score_net.apply({"params": params}, x_t, t, train=False)


# --------------------------------------------------------------------------
# Evaluating a trained run on a task.
# --------------------------------------------------------------------------


def prior_params(state) -> Any:
  """The prior's ε-network params of a TrainState: the EMA score network
  (clean, naive, flowdiff), or the frozen prior of an "amortized" run."""
  if "score" in state.ema_params:
    return state.ema_params["score"]
  if state.objective.method == "amortized" and state.objective.prior == "diffusion":
    return state.params["prior"]
  raise ValueError(f"The run (method {state.objective.method!r}, prior "
                   f"{state.objective.prior!r}) has no diffusion prior to solve with.")


def _stats(values: np.ndarray) -> dict[str, float]:
  v = np.asarray(values, np.float64)
  return {"mean": float(v.mean()), "sem": float(v.std(ddof=1) / np.sqrt(v.size)) if v.size > 1
          else float("nan")}


def evaluate_task(state, images: np.ndarray, index: np.ndarray, op: operators.Operator,
                  solvers: list[Solver], *, batch_size: int = 32, seed: int = 0,
                  corruption_seed: int = CORRUPTION_SEED, flow: bool = True,
                  flow_samples: int = 16, num_chunks: int = 10, log=print,
                  mesh: jax.sharding.Mesh | None = None) -> dict[str, Any]:
  """Corrupts clean images with `op`, solves with each solver, and scores the results.

  Args:
    state: a TrainState with a diffusion prior (`prior_params`).
    images: clean test images, float32 [N, H, W, C] in [-1, 1].
    index: their dataset indices [N]: image i is corrupted with
      operators.corrupt(op, ·, index[i], corruption_seed) and solved with
      example_keys(seed, index)[i], whatever the batching.
    op: the task's operator.
    solvers: DPS / PiGDM instances.
    batch_size: images per solve (N must divide by it).
    flow: add the run's amortized flow (flow methods, when `op` is the
      operator it was trained on): one flow sample per image, and the mean of
      `flow_samples` samples.
    num_chunks: progress reports per batch and solver.
    log: where progress lines go (None: silent).
    mesh: a mesh with axis "data" to shard the batch over (None: one device).
  Returns:
    {"rows": {name: {"psnr": {mean, sem}, "ssim": {...}, "wall_s", "settings"}},
     "per_image": {name: {"psnr": [N], "ssim": [N]}}, "images": {name: [N, H, W, C]}}
    with rows "observation" (A⁺y), one per solver, and "flow_sample"/"flow_mean".
  """
  from flowdiff_jax import evaluation  # noqa: PLC0415
  from flowdiff_jax import train_step as ts  # noqa: PLC0415

  n = images.shape[0]
  if n % batch_size:
    raise ValueError(f"num_images={n} must be a multiple of batch_size={batch_size}")
  obj = state.objective
  eps_apply, params = NetworkEps(obj), prior_params(state)
  use_flow = (flow and obj.method in ts.FLOW_METHODS and obj.operator == op)
  put = (lambda a: a) if mesh is None else functools.partial(
      jax.device_put, device=ts.batch_sharding(mesh))
  corrupt = jax.jit(operators.corrupt, static_argnums=0)
  keys_of = jax.jit(example_keys, static_argnums=0)
  flow_fn = jax.jit(ts.posterior_samples, static_argnames="num_samples")
  metrics = jax.jit(lambda a, b: (evaluation.psnr(a, b), evaluation.ssim(a, b)))
  out = {"images": {}, "per_image": {}, "wall_s": {}}

  def record(name, x, ref):
    p, q = metrics(x, ref)
    out["images"].setdefault(name, []).append(np.asarray(x))
    out["per_image"].setdefault(name, {"psnr": [], "ssim": []})
    out["per_image"][name]["psnr"].append(np.asarray(p))
    out["per_image"][name]["ssim"].append(np.asarray(q))

  for b in range(0, n, batch_size):
    x = put(jnp.asarray(images[b:b + batch_size], jnp.float32))
    idx = jnp.asarray(index[b:b + batch_size], jnp.int32)
    measured = corrupt(op, x, idx, corruption_seed)
    y = measured.pop("y")
    omega = measured
    record("observation", op.pinv(y, omega), x)
    record("clean", x, x)
    keys = keys_of(seed, idx)
    for solver in solvers:
      bar = None if log is None else ProgressBar(
          f"{solver.name} images {b + 1}-{b + batch_size}/{n}", solver.num_steps + 1)
      start = time.time()
      sol = solve_chunked(solver, eps_apply, params, obj.schedule, op, y, omega, keys,
                          num_chunks=num_chunks, progress=bar)
      sol = jax.block_until_ready(sol)
      out["wall_s"][solver.name] = out["wall_s"].get(solver.name, 0.0) + time.time() - start
      record(solver.name, sol, x)
    if use_flow:
      start = time.time()
      # The flow's rng per batch: folded from the solver seed and the first index.
      samples = flow_fn(state, {"y": y, "omega": omega},
                        jax.random.fold_in(jax.random.key(seed + 1), int(index[b])),
                        num_samples=flow_samples)
      samples = jax.block_until_ready(samples)
      out["wall_s"]["flow"] = out["wall_s"].get("flow", 0.0) + time.time() - start
      record("flow_sample", samples[0], x)
      record(f"flow_mean{flow_samples}", jnp.mean(samples, axis=0), x)

  settings = {s.name: {k: v for k, v in dataclasses.asdict(s).items()} for s in solvers}
  rows = {}
  for name, per in out["per_image"].items():
    if name == "clean":
      continue
    per["psnr"] = np.concatenate(per["psnr"]).tolist()
    per["ssim"] = np.concatenate(per["ssim"]).tolist()
    row = {"psnr": _stats(per["psnr"]), "ssim": _stats(per["ssim"])}
    wall = out["wall_s"].get("flow" if name.startswith("flow") else name)
    if wall is not None:
      row["wall_s"] = wall
    if name in settings:
      row["settings"] = settings[name]
    rows[name] = row
  del out["per_image"]["clean"]
  return {"rows": rows, "per_image": out["per_image"],
          "images": {k: np.concatenate(v) for k, v in out["images"].items()}}


def _grid(result: dict[str, Any], num_shown: int) -> np.ndarray:
  """uint8 grid: a row per image, columns observation | solvers | flow | clean."""
  from flowdiff_jax import data, evaluation  # noqa: PLC0415

  names = [k for k in result["images"] if k not in ("observation", "clean")]
  cols = ["observation", *names, "clean"]
  shown = [result["images"][c][:num_shown] for c in cols]
  stacked = np.stack(shown, axis=1).reshape((-1,) + shown[0].shape[1:])
  return evaluation.image_grid(data.to_uint8(stacked), num_cols=len(cols))


def _markdown(report: dict[str, Any]) -> str:
  op = report["operator"]
  lines = [f"# {report['task']}: prior `{report['prior_method']}` ({report['workdir']}, "
           f"step {report['checkpoint_step']})", "",
           f"Operator {op}; σ_y on the [-1, 1] scale. {report['num_images']} test images "
           f"(indices {report['first_image']}…{report['first_image'] + report['num_images'] - 1}), "
           f"corruption seed {report['corruption_seed']}, solver seed {report['seed']}.", "",
           "| method | PSNR (dB) ↑ | SSIM ↑ | wall (s) | settings |", "|---|---:|---:|---:|---|"]
  for name, row in report["rows"].items():
    settings = ", ".join(f"{k}={v}" for k, v in row.get("settings", {}).items())
    wall = f"{row['wall_s']:.0f}" if "wall_s" in row else ""
    lines.append(f"| {name} | {row['psnr']['mean']:.2f} ± {row['psnr']['sem']:.2f} | "
                 f"{row['ssim']['mean']:.3f} ± {row['ssim']['sem']:.3f} | {wall} | {settings} |")
  lines += ["", f"± is the standard error over images. {report['hardware']}, {report['date']}.",
            f"Command: `{report['command']}`", ""]
  return "\n".join(lines)


def collect_table(directory: str) -> str:
  """A Markdown table of every metrics.json under `directory`: a row per (prior, method),
  a PSNR / SSIM column pair per task. The observation row is shown once when
  every prior saw the same observations (same images and seeds)."""
  reports = []
  for root, _, files in sorted(os.walk(directory)):
    if "metrics.json" in files:
      with open(os.path.join(root, "metrics.json")) as f:
        reports.append(json.load(f))
  tasks = [t for t in TASKS if any(r["task"] == t for r in reports)]
  cells: dict[tuple[str, str], dict[str, str]] = {}
  for r in reports:
    label = r.get("label") or r["prior_method"]
    for name, row in r["rows"].items():
      cells.setdefault((label, name), {})[r["task"]] = (
          f"{row['psnr']['mean']:.2f} | {row['ssim']['mean']:.3f}")
  observed = {k: v for k, v in cells.items() if k[1] == "observation"}
  if len({json.dumps(v, sort_keys=True) for v in observed.values()}) == 1:
    for key in observed:
      del cells[key]
    cells = {("(all)", "observation A⁺y"): next(iter(observed.values())), **cells}
  header = "| prior | method | " + " | ".join(f"{t} PSNR | {t} SSIM" for t in tasks) + " |"
  lines = [header, "|---|---|" + "---:|---:|" * len(tasks)]
  for (label, name), row in cells.items():
    lines.append(f"| {label} | {name} | " +
                 " | ".join(row.get(t, "– | –") for t in tasks) + " |")
  return "\n".join(lines) + "\n"


def _hardware() -> str:
  dev = jax.devices()[0]
  return (f"{jax.device_count()}× {dev.device_kind} ({jax.default_backend()}), "
          f"{os.cpu_count()} CPU cores, {platform.node()}, jax {jax.__version__}")


def run(workdir: str, task: str, *, output_dir: str | None = None, num_images: int = 64,
        first_image: int = 0, batch_size: int = 32, solvers: tuple[str, ...] = ("dps", "pigdm"),
        dps_zeta: float | None = None, dps_steps: int = 1000, pigdm_steps: int = 100,
        pigdm_data_var: float = 1.0, eta: float = 1.0, seed: int = 0,
        corruption_seed: int = CORRUPTION_SEED, step: int | None = None, flow_samples: int = 16,
        num_shown: int = 8, label: str = "", command: str = "",
        log=print) -> dict[str, Any]:
  """The CLI: restores `workdir`'s prior, solves `task` on held-out test images, writes the report.

  Writes output_dir/metrics.json, metrics.md and grid.png (default
  output_dir: workdir/inverse/<task>) and returns the report (metrics.json).
  """
  from flowdiff_jax import checkpoint, data, evaluation  # noqa: PLC0415
  from flowdiff_jax import train_step as ts  # noqa: PLC0415

  op = task_operator(task)
  config, state = checkpoint.load_run(workdir, step=step)
  if config.data.dataset not in data.DATASETS:
    raise ValueError(f"The run's data ({config.data.dataset!r}) have no clean test images; "
                     "the inverse problems need a dataset with clean images.")
  zeta = TASKS[task]["dps_zeta"] if dps_zeta is None else dps_zeta
  make = {"dps": lambda: DPS(zeta=zeta, num_steps=dps_steps, eta=eta),
          "pigdm": lambda: PiGDM(num_steps=pigdm_steps, eta=eta, data_var=pigdm_data_var)}
  unknown = [s for s in solvers if s not in make]
  if unknown:
    raise ValueError(f"--solvers: unknown {unknown}; allowed: {', '.join(make)}")
  images, index = load_test_images(config, first_image, num_images)
  mesh = ts.make_mesh() if batch_size % jax.device_count() == 0 else None
  start = time.time()
  result = evaluate_task(state, images, index, op, [make[s]() for s in solvers],
                         batch_size=batch_size, seed=seed, corruption_seed=corruption_seed,
                         flow_samples=flow_samples, log=log, mesh=mesh)
  report = {
      "workdir": workdir, "label": label,
      "checkpoint_step": int(jax.device_get(state.step)), "prior_method": config.method,
      "run_operator": dict(config.operator), "task": task,
      "operator": {"name": op.name, **dataclasses.asdict(op)},
      "num_images": num_images, "first_image": first_image, "batch_size": batch_size,
      "corruption_seed": corruption_seed, "seed": seed, "rows": result["rows"],
      "per_image": result["per_image"], "wall_s_total": time.time() - start,
      "hardware": _hardware(), "date": datetime.date.today().isoformat(),
      "command": command}
  output_dir = output_dir or os.path.join(workdir, "inverse", task)
  os.makedirs(output_dir, exist_ok=True)
  with open(os.path.join(output_dir, "metrics.json"), "w") as f:
    json.dump(report, f, indent=1)
  with open(os.path.join(output_dir, "metrics.md"), "w") as f:
    f.write(_markdown(report))
  evaluation.save_png(os.path.join(output_dir, "grid.png"), _grid(result, num_shown))
  if log is not None:
    log(_markdown(report))
    log(f"Wrote {output_dir}/metrics.json, metrics.md, grid.png")
  return report


def load_test_images(config, first_image: int, num_images: int) -> tuple[np.ndarray, np.ndarray]:
  """Held-out images first_image … first_image + num_images − 1 of the run's dataset:
  (float32 [N, H, W, C] in [-1, 1], their indices int32 [N])."""
  from flowdiff_jax import data  # noqa: PLC0415

  cfg = config.copy_and_resolve_references()
  with cfg.unlocked():
    cfg.data.num_eval_examples = first_image + num_images
    cfg.eval.batch_size = 1  # every image, in order (eval_batches keeps whole batches only)
  batches = data.eval_batches(cfg, process_index=0, process_count=1)[first_image:]
  if len(batches) < num_images:
    raise ValueError(f"The test split has only {first_image + len(batches)} images; asked for "
                     f"{num_images} from index {first_image}.")
  images = np.concatenate([b["image"] for b in batches])
  index = np.concatenate([b["index"] for b in batches]).astype(np.int32)
  return np.asarray(data.to_model_range(images)), index


def main(argv):
  from absl import flags  # noqa: PLC0415

  del argv
  f = flags.FLAGS
  if f.collect:
    table = collect_table(f.collect)
    print(table)
    if f.output_dir:
      os.makedirs(f.output_dir, exist_ok=True)
      with open(os.path.join(f.output_dir, "table.md"), "w") as out:
        out.write(table)
    return
  if not f.workdir or not f.task:
    raise flags.ValidationError("--workdir and --task are required (or --collect=DIR).")
  run(f.workdir, f.task, output_dir=f.output_dir, num_images=f.num_images,
      first_image=f.first_image, batch_size=f.batch_size, solvers=tuple(f.solvers),
      dps_zeta=f.dps_zeta, dps_steps=f.dps_steps, pigdm_steps=f.pigdm_steps,
      pigdm_data_var=f.pigdm_data_var, eta=f.eta, seed=f.seed,
      corruption_seed=f.corruption_seed, step=f.step, flow_samples=f.flow_samples,
      num_shown=f.num_shown, label=f.label,
      command="python -m flowdiff_jax.inverse " + " ".join(sys.argv[1:]))


def _define_flags():
  from absl import flags  # noqa: PLC0415

  flags.DEFINE_string("workdir", None, "Workdir of the trained run (clean, naive or flowdiff).")
  flags.DEFINE_enum("task", None, list(TASKS), "Inverse problem; its operator is in TASKS.")
  flags.DEFINE_string("output_dir", None, "Where the report goes; default WORKDIR/inverse/TASK. "
                      "With --collect: where table.md goes (optional).")
  flags.DEFINE_integer("num_images", 64, "Number of held-out test images.")
  flags.DEFINE_integer("first_image", 0, "Index of the first test image (e.g. 1000 to tune on "
                       "images the table does not use).")
  flags.DEFINE_integer("batch_size", 32, "Images solved together (num_images must divide by it).")
  flags.DEFINE_list("solvers", ["dps", "pigdm"], "Solvers to run: dps, pigdm.")
  flags.DEFINE_float("dps_zeta", None, "DPS step size ζ; default: the task's (TASKS).")
  flags.DEFINE_integer("dps_steps", 1000, "DPS steps (+1 final step).")
  flags.DEFINE_integer("pigdm_steps", 100, "ΠGDM steps (+1 final step).")
  flags.DEFINE_float("pigdm_data_var", 1.0, "ΠGDM's prior variance v in r_t² (paper: 1).")
  flags.DEFINE_float("eta", 1.0, "DDIM η of both solvers: 1 ancestral, 0 deterministic.")
  flags.DEFINE_integer("seed", 0, "Solver seed (image i uses fold_in(key(seed), index i)).")
  flags.DEFINE_integer("corruption_seed", CORRUPTION_SEED, "Seed of the test corruption.")
  flags.DEFINE_integer("step", None, "Checkpoint step; default the newest.")
  flags.DEFINE_integer("flow_samples", 16, "Flow samples averaged for the flow_mean row.")
  flags.DEFINE_integer("num_shown", 8, "Images (rows) in grid.png.")
  flags.DEFINE_string("label", "", "Name of the prior in --collect tables (default its method).")
  flags.DEFINE_string("collect", None, "Instead of solving: gather every metrics.json under "
                      "this folder into one table.")


if __name__ == "__main__":
  from absl import app  # noqa: PLC0415

  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  _define_flags()
  app.run(main)
