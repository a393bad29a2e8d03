"""The reusable core: TrainState, the pure train/eval steps and their sharded jitted forms.

`train_step(state, batch, rng) -> (state, metrics)` is a pure function: no host
syncs, no globals, no Python side effects. It knows nothing about the loop,
files or logging, so it can be imported into other JAX projects and used under
plain `jax.jit`, `jax.jit` with shardings over a mesh, `jax.shard_map` or
`jax.pmap` (pass `axis_name` there so gradients and metrics are averaged over
the mapped axis).

Methods (DESIGN 2.6) handled here:
  * "clean": denoising score matching (DSM) on the clean images `batch["x"]`;
  * "naive": DSM on A⁺y, the pseudo-inverse of the corrupted observations;
  * "amortized": the conditional flow alone, trained with the amortized
    inference loss (DESIGN 2.3) against a fixed prior (a frozen diffusion
    prior's NLL bound, or an analytic Gaussian).

Randomness: `rng` is the run's root training key; the step folds in
`state.step`, so a resumed run draws exactly what an uninterrupted one would.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from flowdiff_jax import diffusion, evaluation, losses, operators
from flowdiff_jax.models import flow as flow_lib
from flowdiff_jax.models import unet

METHODS = ("clean", "naive", "amortized")
# Batch keys each method reads; the training program removes the others.
METHOD_INPUTS = {"clean": ("x",), "naive": ("y", "omega"), "amortized": ("y", "omega")}
# Fixed priors of the amortized method.
PRIORS = ("diffusion", "gaussian")

Batch = dict[str, Any]
Metrics = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class Objective:
  """Everything static that defines what a step optimises (hashable, so jit-static).

  Attributes:
    method: one of METHODS.
    schedule: the diffusion schedule (of the prior run, for "amortized").
    operator: the forward operator A_ω with its σ_y.
    ema_decay: decay of the parameter EMA.
    score_net: the ε-prediction U-Net (the frozen prior's, for "amortized").
    flow: the conditional flow q_φ(x | y, ω) ("amortized" only).
    prior: "diffusion" (the frozen score_net's NLL bound) or "gaussian"
      (analytic N(mean, scale_tril scale_trilᵀ)); "amortized" only.
    beta_data, beta_prior, beta_ent: weights of the amortized loss terms.
    num_flow_samples: flow samples per observation in the loss.
    num_time_samples: (t, ε) draws per sample in the diffusion NLL bound.
    residual: the flow models x − A⁺y rather than x.
  """
  method: str
  schedule: diffusion.VPSchedule
  operator: operators.Operator
  ema_decay: float
  score_net: unet.UNet
  flow: flow_lib.ConditionalGlow | None = None
  prior: str = "diffusion"
  beta_data: float = 1.0
  beta_prior: float = 1.0
  beta_ent: float = 1.0
  num_flow_samples: int = 1
  num_time_samples: int = 1
  residual: bool = True


class TrainState(flax.struct.PyTreeNode):
  """Parameters, optimiser state and EMA; what uses them is in the static fields.

  Attributes:
    step: int32 scalar, number of updates applied.
    params: {"score": U-Net params} for "clean"/"naive"; {"flow": flow variables,
      "prior": frozen prior params} for "amortized".
    ema_params: exponential moving average of `params`, used for evaluation.
    opt_state: optax state of `tx`.
    tx: the optimiser over the whole `params` tree (one transform per network).
    objective: networks, schedule, operator, method and loss settings.
  """
  step: jax.Array
  params: Any
  ema_params: Any
  opt_state: optax.OptState
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


def _score_net(config: ml_collections.ConfigDict, channels: int) -> unet.UNet:
  # The time embedding sees t * T, as DDPM's network saw its integer steps.
  return unet.unet_from_config(config.model, channels=channels).clone(
      time_scale=float(config.diffusion.num_timesteps))


def make_objective(config: ml_collections.ConfigDict, channels: int,
                   prior_config: ml_collections.ConfigDict | None = None) -> Objective:
  """The static part of the state; for "amortized" + "diffusion" the score net
  and schedule come from the prior run's config."""
  net_config = prior_config if prior_config is not None else config
  obj = Objective(method=config.method,
                  schedule=diffusion.make_schedule(net_config.diffusion),
                  operator=operators.make_operator(config.operator),
                  ema_decay=float(config.optim.ema_decay),
                  score_net=_score_net(net_config, channels))
  if config.method != "amortized":
    return obj
  am = config.amortized
  return dataclasses.replace(
      obj, flow=flow_lib.flow_from_config(config.flow), prior=am.prior,
      beta_data=float(am.beta_data), beta_prior=float(am.beta_prior),
      beta_ent=float(am.beta_ent), num_flow_samples=int(am.num_flow_samples),
      num_time_samples=int(am.num_time_samples), residual=bool(config.flow.residual))


def _images_shape(batch: Batch) -> tuple[int, int, int]:
  return (batch["x"] if "x" in batch else batch["y"]).shape[1:]


def create_train_state(config: ml_collections.ConfigDict, rng: jax.Array, sample_batch: Batch,
                       *, prior_params: Any = None,
                       prior_config: ml_collections.ConfigDict | None = None) -> TrainState:
  """Initialises a TrainState; no data loader, loop or devices involved.

  Args:
    config: a validated config (see `flowdiff_jax.validate`).
    rng: init key.
    sample_batch: a batch as `train_step` takes it ({"x"} or {"y", "omega"});
      gives the image shape, and the flow's ActNorm layers initialise on it.
    prior_params: "amortized" only: the frozen prior, i.e. the score network's
      params (prior "diffusion") or {"mean": [H, W, C], "scale_tril": [D, D]}
      (prior "gaussian", D = H·W·C).
    prior_config: "amortized" + "diffusion": the config of the run that
      trained the prior (its U-Net and schedule).
  """
  shape = _images_shape(sample_batch)
  obj = make_objective(config, shape[-1], prior_config)
  if config.method == "amortized":
    if prior_params is None:
      raise ValueError("method 'amortized' needs prior_params (a frozen prior)")
    op = obj.operator
    cond = flow_lib.conditioning_input(op, sample_batch["y"], sample_batch["omega"])
    # ActNorm initialises on the first batch of what the flow models: x − A⁺y
    # with the residual base, else images near A⁺y.
    pinv = op.pinv(sample_batch["y"], sample_batch["omega"])
    noise_rng, init_rng = jax.random.split(rng)
    spread = 0.1 * jax.random.normal(noise_rng, pinv.shape)  # a guess of the posterior's scale
    target = spread if obj.residual else pinv + spread
    params = {"flow": obj.flow.init(init_rng, target, cond), "prior": prior_params}
    tx = optax.multi_transform(
        {"flow": make_optimizer(config.flow_optim), "prior": optax.set_to_zero()},
        {"flow": "flow", "prior": "prior"})
  else:
    x = jnp.zeros((1, *shape), jnp.float32)
    params = {"score": obj.score_net.init(rng, x, jnp.zeros((1,)), train=False)["params"]}
    tx = optax.multi_transform({"score": make_optimizer(config.optim)}, {"score": "score"})
  # The EMA gets its own buffers: params and ema_params are donated separately.
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    ema_params=jax.tree.map(jnp.copy, params), opt_state=tx.init(params),
                    tx=tx, objective=obj)


def _eps_fn(obj: Objective, score_params, *, train: bool = False, dropout_rng=None):
  """(x_t [B, H, W, C], t [B]) -> ε̂ of the score network with these params."""
  rngs = {"dropout": dropout_rng} if train else None
  return lambda x_t, t: obj.score_net.apply({"params": score_params}, x_t, t, train=train,
                                            rngs=rngs)


def _dsm_input(objective: Objective, batch: Batch) -> jax.Array:
  """The images the score network is trained on, [B, H, W, C]."""
  if objective.method == "clean":
    return batch["x"]
  if objective.method == "naive":
    return objective.operator.pinv(batch["y"], batch["omega"])
  raise ValueError(f"method={objective.method!r} has no DSM input")


def prior_log_prob(obj: Objective, prior_params: Any, rng: jax.Array):
  """x [N, H, W, C] -> log p(x) [N] of the fixed prior (a bound for "diffusion").

  The prior's params are held fixed (stop_gradient); gradients reach x only.
  """
  prior_params = jax.lax.stop_gradient(prior_params)
  if obj.prior == "gaussian":
    def log_prob(x):
      d = x.reshape(x.shape[0], -1) - prior_params["mean"].reshape(1, -1)
      tril = prior_params["scale_tril"]
      w = jax.scipy.linalg.solve_triangular(tril, d.T, lower=True)
      return (-0.5 * jnp.sum(w * w, axis=0) - jnp.sum(jnp.log(jnp.diag(tril)))
              - 0.5 * d.shape[-1] * jnp.log(2 * jnp.pi))
    return log_prob
  eps_fn = _eps_fn(obj, prior_params)
  return lambda x: -diffusion.nll_bound(eps_fn, obj.schedule, x, rng,
                                        num_time_samples=obj.num_time_samples)


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
  loss_rng, dropout_rng, prior_rng = jax.random.split(rng, 3)

  if obj.method == "amortized":
    def loss_fn(params):
      return losses.amortized_flow_loss(
          obj.flow, params["flow"], loss_rng, batch["y"], batch["omega"], obj.operator,
          prior_log_prob(obj, params["prior"], prior_rng),
          num_samples=obj.num_flow_samples, beta_data=obj.beta_data,
          beta_prior=obj.beta_prior, beta_ent=obj.beta_ent, residual=obj.residual)
  else:
    x = _dsm_input(obj, batch)

    def loss_fn(params):
      eps_fn = _eps_fn(obj, params["score"], train=True, dropout_rng=dropout_rng)
      loss = jnp.mean(diffusion.dsm_loss(eps_fn, obj.schedule, x, loss_rng))
      return loss, {"dsm_loss": loss}

  (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  if axis_name is not None:
    grads = jax.lax.pmean(grads, axis_name)
    terms = jax.lax.pmean(terms, axis_name)
  updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  ema_params = optax.incremental_update(params, state.ema_params, 1.0 - obj.ema_decay)
  new_state = state.replace(step=state.step + 1, params=params,
                            ema_params=ema_params, opt_state=opt_state)
  metrics = {f"train/{k}": v for k, v in terms.items()}
  metrics["train/grad_norm"] = optax.global_norm(grads)
  if obj.method == "amortized":
    # Likelihood terms also in bits per dimension.
    metrics["train/prior_nll_bpd"] = terms["prior_nll"] / jnp.log(2.0)
  return new_state, metrics


def posterior_samples(state: TrainState, batch: Batch, rng: jax.Array,
                      num_samples: int) -> jax.Array:
  """Draws [num_samples, B, H, W, C] from the flow's q(x | y, ω) ("amortized").

  The flow's current params are used: the EMA (decay tuned for the score
  network's long runs) would lag a flow trained for a few thousand steps.
  """
  obj = state.objective
  y, omega = batch["y"], batch["omega"]
  cond = flow_lib.conditioning_input(obj.operator, y, omega)
  base = obj.operator.pinv(y, omega) if obj.residual else None
  x, _ = flow_lib.sample(obj.flow, state.params["flow"], rng, cond, num_samples, base=base)
  return x


def eval_step(state: TrainState, batch: Batch, rng: jax.Array, *,
              axis_name: str | None = None, num_posterior_samples: int = 16) -> Metrics:
  """Held-out metrics; `batch` has "x", "y", "omega" ([B, H, W, C]).

  "clean"/"naive": eval/dsm_loss_clean, the DSM loss of the EMA score network
  on *clean* images (comparable across methods: how well each prior fits
  clean data).
  "amortized": PSNR (dB, images in [-1, 1]) against the clean images of the
  posterior mean of `num_posterior_samples` flow samples, of the observation y
  and of A⁺y, and the mean per-pixel posterior std.
  """
  obj = state.objective
  x = batch["x"]
  if obj.method != "amortized":
    per_example = diffusion.dsm_loss(_eps_fn(obj, state.ema_params["score"]), obj.schedule,
                                     x, rng)
    return {"eval/dsm_loss_clean": _mean(per_example, axis_name)}
  samples = posterior_samples(state, batch, rng, num_posterior_samples)
  mean, std = jnp.mean(samples, axis=0), jnp.std(samples, axis=0)
  pinv = obj.operator.pinv(batch["y"], batch["omega"])
  return {"eval/psnr_posterior_mean": _mean(evaluation.psnr(mean, x), axis_name),
          "eval/psnr_observation": _mean(evaluation.psnr(batch["y"], x), axis_name),
          "eval/psnr_pinv": _mean(evaluation.psnr(pinv, x), axis_name),
          "eval/posterior_std": _mean(std, axis_name)}


def sample_prior(state: TrainState, rng: jax.Array, num_samples: int,
                 image_shape: tuple[int, int, int], *, sampler: str,
                 num_steps: int) -> jax.Array:
  """Samples [num_samples, H, W, C] in [-1, 1] from the EMA score network."""
  eps_fn = _eps_fn(state.objective, state.ema_params["score"])
  return diffusion.sample(eps_fn, state.objective.schedule, rng, (num_samples, *image_shape),
                          sampler=sampler, num_steps=num_steps)


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


def make_eval_step(mesh: jax.sharding.Mesh, num_posterior_samples: int = 16):
  rep, data = replicated(mesh), batch_sharding(mesh)
  step = functools.partial(eval_step, num_posterior_samples=num_posterior_samples)
  return jax.jit(step, in_shardings=(rep, data, rep), out_shardings=rep)
