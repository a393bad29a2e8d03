"""The reusable core: TrainState, the pure train/eval steps and their sharded jitted forms.

`train_step(state, batch, rng) -> (state, metrics)` is a pure function: no host
syncs, no globals, no Python side effects. It knows nothing about the loop,
files or logging, so it can be imported into other JAX projects and used under
plain `jax.jit`, `jax.jit` with shardings over a mesh, `jax.shard_map` or
`jax.pmap` (pass `axis_name` there so gradients and metrics are averaged over
the mapped axis).

Methods (DESIGN 2.6) handled here:
  * "clean": denoising score matching (DSM) on the clean images `batch["x"]`;
  * "naive": DSM on A⁺y, the pseudo-inverse of the corrupted observations.

Randomness: `rng` is the run's root training key; the step folds in
`state.step`, so a resumed run draws exactly what an uninterrupted one would.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from flowdiff_jax import diffusion, operators
from flowdiff_jax.models import unet

METHODS = ("clean", "naive")
# Batch keys each method reads; the training program removes the others.
METHOD_INPUTS = {"clean": ("x",), "naive": ("y", "omega")}

Batch = dict[str, Any]
Metrics = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class Objective:
  """Everything static that defines what a step optimises (hashable, so jit-static)."""
  method: str
  schedule: diffusion.VPSchedule
  operator: operators.Operator
  ema_decay: float


class TrainState(flax.struct.PyTreeNode):
  """Parameters, optimiser state and EMA; the functions that use them are static fields.

  Attributes:
    step: int32 scalar, number of updates applied.
    params: {"score": U-Net params}.
    ema_params: exponential moving average of `params`, used for sampling.
    opt_state: optax state of `tx`.
    apply_fn: the score network's `apply`, (params, x_t [B,H,W,C], t [B], train) -> ε̂.
    tx: the optimiser over the whole `params` tree.
    objective: method, diffusion schedule, operator, EMA decay.
  """
  step: jax.Array
  params: Any
  ema_params: Any
  opt_state: optax.OptState
  apply_fn: Callable[..., jax.Array] = flax.struct.field(pytree_node=False)
  tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)
  objective: Objective = flax.struct.field(pytree_node=False)


def make_optimizer(optim: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """AdamW with linear warm-up and optional global-norm clipping."""
  lr = optax.linear_schedule(0.0, optim.learning_rate, max(1, optim.warmup_steps))
  parts = []
  if optim.grad_clip_norm > 0:
    parts.append(optax.clip_by_global_norm(optim.grad_clip_norm))
  parts.append(optax.adamw(lr, b1=optim.b1, b2=optim.b2, eps=optim.eps,
                           weight_decay=optim.weight_decay))
  return optax.chain(*parts)


def make_objective(config: ml_collections.ConfigDict) -> Objective:
  return Objective(method=config.method,
                   schedule=diffusion.make_schedule(config.diffusion),
                   operator=operators.make_operator(config.operator),
                   ema_decay=float(config.optim.ema_decay))


def create_train_state(config: ml_collections.ConfigDict, rng: jax.Array,
                       image_shape: tuple[int, int, int]) -> TrainState:
  """Initialises a TrainState; no data, loop or devices involved.

  Args:
    config: a validated config (see `flowdiff_jax.validate`).
    rng: init key.
    image_shape: (H, W, C) of the images.
  """
  # The time embedding sees t * T, as DDPM's network saw its integer steps.
  model = unet.unet_from_config(config.model, channels=image_shape[-1]).clone(
      time_scale=float(config.diffusion.num_timesteps))
  x = jnp.zeros((1, *image_shape), jnp.float32)
  params = {"score": model.init(rng, x, jnp.zeros((1,)), train=False)["params"]}
  # One optimiser per network; the FlowDiff method adds a "flow" entry.
  tx = optax.multi_transform({"score": make_optimizer(config.optim)},
                             {"score": "score"})

  def apply_fn(score_params, x_t, t, train, rngs=None):
    return model.apply({"params": score_params}, x_t, t, train=train, rngs=rngs)

  # The EMA gets its own buffers: params and ema_params are donated separately.
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    ema_params=jax.tree.map(jnp.copy, params), opt_state=tx.init(params),
                    apply_fn=apply_fn, tx=tx, objective=make_objective(config))


def _dsm_input(objective: Objective, batch: Batch) -> jax.Array:
  """The images the score network is trained on, [B, H, W, C]."""
  if objective.method == "clean":
    return batch["x"]
  if objective.method == "naive":
    return objective.operator.pinv(batch["y"], batch["omega"])
  raise ValueError(f"method={objective.method!r}; allowed: {', '.join(METHODS)}")


def _mean(x: jax.Array, axis_name: str | None) -> jax.Array:
  x = jnp.mean(x)
  return x if axis_name is None else jax.lax.pmean(x, axis_name)


def train_step(state: TrainState, batch: Batch, rng: jax.Array, *,
               axis_name: str | None = None) -> tuple[TrainState, Metrics]:
  """One update of the score network.

  Args:
    state: the current TrainState.
    batch: {"x": [B, H, W, C]} for "clean"; {"y": [B, H, W, C], "omega": {...}}
      for "naive"; images in [-1, 1].
    rng: the run's root training key (the step index is folded in here).
    axis_name: name of a mapped axis (pmap / shard_map) to average over; None
      under jit, where the batch is global.

  Returns:
    The new state and scalar metrics, averaged over the global batch:
    "train/dsm_loss" (squared ε error per dimension) and "train/grad_norm"
    (global norm of the averaged gradient, before clipping).
  """
  obj = state.objective
  rng = jax.random.fold_in(rng, state.step)
  if axis_name is not None:
    # Each shard is a different part of the batch: it needs its own draws.
    rng = jax.random.fold_in(rng, jax.lax.axis_index(axis_name))
  dsm_rng, dropout_rng = jax.random.split(rng)
  x = _dsm_input(obj, batch)

  def loss_fn(params):
    eps_fn = functools.partial(state.apply_fn, params["score"], train=True,
                               rngs={"dropout": dropout_rng})
    per_example = diffusion.dsm_loss(lambda x_t, t: eps_fn(x_t, t), obj.schedule, x, dsm_rng)
    return jnp.mean(per_example)

  loss, grads = jax.value_and_grad(loss_fn)(state.params)
  if axis_name is not None:
    grads = jax.lax.pmean(grads, axis_name)
    loss = jax.lax.pmean(loss, axis_name)
  updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  ema_params = optax.incremental_update(params, state.ema_params, 1.0 - obj.ema_decay)
  new_state = state.replace(step=state.step + 1, params=params,
                            ema_params=ema_params, opt_state=opt_state)
  metrics = {"train/dsm_loss": loss, "train/grad_norm": optax.global_norm(grads)}
  return new_state, metrics


def eval_step(state: TrainState, batch: Batch, rng: jax.Array, *,
              axis_name: str | None = None) -> Metrics:
  """Held-out DSM loss of the EMA score network on clean images (per dimension).

  Comparable across methods: it measures how well each prior fits *clean*
  data, whatever it was trained on. `batch["x"]`: [B, H, W, C].
  """
  obj = state.objective
  eps_fn = functools.partial(state.apply_fn, state.ema_params["score"], train=False)
  per_example = diffusion.dsm_loss(lambda x_t, t: eps_fn(x_t, t), obj.schedule,
                                   batch["x"], rng)
  return {"eval/dsm_loss_clean": _mean(per_example, axis_name)}


def sample_prior(state: TrainState, rng: jax.Array, num_samples: int,
                 image_shape: tuple[int, int, int], *, sampler: str,
                 num_steps: int) -> jax.Array:
  """Samples [num_samples, H, W, C] in [-1, 1] from the EMA score network."""
  eps_fn = functools.partial(state.apply_fn, state.ema_params["score"], train=False)
  return diffusion.sample(lambda x_t, t: eps_fn(x_t, t), state.objective.schedule, rng,
                          (num_samples, *image_shape), sampler=sampler, num_steps=num_steps)


# --------------------------------------------------------------------------
# Sharded, jitted forms used by the training program.
# --------------------------------------------------------------------------


def make_mesh(devices=None) -> jax.sharding.Mesh:
  """A 1-D data-parallel mesh over all devices of all processes (axis "data").

  Auto axis types: with Explicit axes (jax.make_mesh's default) some gradients
  of the replicated parameters fail to compile.
  """
  devices = jax.devices() if devices is None else devices
  return jax.make_mesh((len(devices),), ("data",), devices=devices,
                       axis_types=(jax.sharding.AxisType.Auto,))


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
  """Leading (batch) axis split over "data"."""
  return NamedSharding(mesh, P("data"))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def make_train_step(mesh: jax.sharding.Mesh):
  """`train_step` jitted over `mesh`: batch sharded on "data", state replicated and donated."""
  rep, data = replicated(mesh), batch_sharding(mesh)
  return jax.jit(train_step, in_shardings=(rep, data, rep), out_shardings=(rep, rep),
                 donate_argnums=0)


def make_eval_step(mesh: jax.sharding.Mesh):
  rep, data = replicated(mesh), batch_sharding(mesh)
  return jax.jit(eval_step, in_shardings=(rep, data, rep), out_shardings=rep)
