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
    prior's NLL bound, or an analytic Gaussian);
  * "flowdiff": the flow and the score network trained jointly (DESIGN 2.4):
    one gradient of L_flow(φ; sg θ) + L_DSM(θ; sg x) on the same batch.

Randomness: `rng` is the run's root training key; the step folds in
`state.step`, so a resumed run draws exactly what an uninterrupted one would.
Per-example draws come from `flowdiff_jax.rng`: under shard_map/pmap a device
takes its rows of the global draw, so every form of the step computes the same
update as `jax.jit` on the global batch (up to float reduction order). The
U-Net's dropout masks are the exception: they are drawn per device, so with
dropout > 0 the forms agree in distribution, not in value.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from flowdiff_jax import diffusion, evaluation, losses, operators
from flowdiff_jax.models import flow as flow_lib
from flowdiff_jax.models import gaussian
from flowdiff_jax.models import unet

METHODS = ("clean", "naive", "amortized", "flowdiff")
# Batch keys each method reads; the training program removes the others.
METHOD_INPUTS = {"clean": ("x",), "naive": ("y", "omega"), "amortized": ("y", "omega"),
                 "flowdiff": ("y", "omega")}
# Methods that train the conditional flow, and those that train a score network.
FLOW_METHODS = ("amortized", "flowdiff")
SCORE_METHODS = ("clean", "naive", "flowdiff")
# Fixed priors of the amortized method.
PRIORS = ("diffusion", "gaussian")
# Score-network families (config.model.name): the DDPM U-Net, or the exact
# ε-network of a Gaussian (for the Gaussian oracle; small images only).
SCORE_MODELS = ("unet", "gaussian")

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
    flow: the conditional flow q_φ(x | y, ω) ("amortized", "flowdiff").
    prior: "diffusion" (the score_net's NLL bound: frozen for "amortized", the
      jointly trained one for "flowdiff") or "gaussian" (analytic
      N(mean, scale_tril scale_trilᵀ); "amortized" only).
    beta_data, beta_prior, beta_ent: weights of the amortized loss terms (the
      values after their schedules' warm-up / annealing).
    beta_prior_warmup_steps: β_prior rises linearly from 0 over these steps.
    beta_ent_init, beta_ent_anneal_steps: β_ent moves linearly from
      beta_ent_init to beta_ent over these steps.
    num_flow_samples: flow samples per observation in the loss.
    num_time_samples: (t, ε) draws per sample in the diffusion NLL bound.
    time_sampling, prior_gradient: of the NLL bound (`diffusion.nll_bound`).
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
  beta_prior_warmup_steps: int = 0
  beta_ent_init: float = 1.0
  beta_ent_anneal_steps: int = 0
  num_flow_samples: int = 1
  num_time_samples: int = 1
  time_sampling: str = "log_snr"
  prior_gradient: str = "exact"
  residual: bool = True

  def loss_weights(self, step: jax.Array) -> dict[str, jax.Array]:
    """β_data, β_prior, β_ent at `step` (the number of updates applied so far)."""
    ramp = lambda start, end, steps: optax.linear_schedule(start, end, steps)(step)  # noqa: E731
    return {"beta_data": jnp.float32(self.beta_data),
            "beta_prior": (ramp(0.0, self.beta_prior, self.beta_prior_warmup_steps)
                           if self.beta_prior_warmup_steps else jnp.float32(self.beta_prior)),
            "beta_ent": (ramp(self.beta_ent_init, self.beta_ent, self.beta_ent_anneal_steps)
                         if self.beta_ent_anneal_steps else jnp.float32(self.beta_ent))}


class TrainState(flax.struct.PyTreeNode):
  """Parameters, optimiser state and EMA; what uses them is in the static fields.

  Attributes:
    step: int32 scalar, number of updates applied.
    params: {"score": U-Net params} for "clean"/"naive"; {"flow": flow variables,
      "prior": frozen prior params} for "amortized"; {"flow", "score"} for "flowdiff".
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


def make_optimizer(optim: ml_collections.ConfigDict,
                   every_k_steps: int = 1) -> optax.GradientTransformation:
  """AdamW with linear warm-up and optional global-norm clipping.

  every_k_steps > 1 averages the gradients of k consecutive steps and updates
  once (optax.MultiSteps); in between the params and the optimiser state stay
  as they are.
  """
  lr = (optax.linear_schedule(0.0, optim.learning_rate, optim.warmup_steps)
        if optim.warmup_steps else optim.learning_rate)
  parts = []
  if optim.grad_clip_norm > 0:
    parts.append(optax.clip_by_global_norm(optim.grad_clip_norm))
  parts.append(optax.adamw(lr, b1=optim.b1, b2=optim.b2, eps=optim.eps,
                           weight_decay=optim.weight_decay))
  tx = optax.chain(*parts)
  if every_k_steps > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=every_k_steps).gradient_transformation()
  return tx


def _compute_options(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The networks' compute dtype and remat flag (model.compute_dtype, training.remat).

  Configs written before these fields existed get the defaults (float32, no remat).
  """
  name = str(config.model.get("compute_dtype", "float32"))
  if name not in unet.COMPUTE_DTYPES:
    raise ValueError(f"config.model.compute_dtype={name!r}: unknown value; allowed: "
                     f"{', '.join(unet.COMPUTE_DTYPES)}")
  return {"dtype": unet.COMPUTE_DTYPES[name],
          "remat": bool(config.training.get("remat", False))}


def _score_net(net_config: ml_collections.ConfigDict, channels: int, options: dict[str, Any]):
  """The score network of `net_config`, computing as `options` (`_compute_options`) say."""
  name = net_config.model.get("name", "unet")
  if name == "gaussian":
    return gaussian.GaussianScore(schedule=diffusion.make_schedule(net_config.diffusion))
  # The time embedding sees t * T, as DDPM's network saw its integer steps.
  return unet.unet_from_config(net_config.model, channels=channels).clone(
      time_scale=float(net_config.diffusion.num_timesteps), **options)


def make_objective(config: ml_collections.ConfigDict, channels: int,
                   prior_config: ml_collections.ConfigDict | None = None) -> Objective:
  """The static part of the state; for "amortized" + "diffusion" the score net
  and schedule come from the prior run's config (its compute dtype and remat
  from this run's: they do not change the parameters)."""
  net_config = prior_config if prior_config is not None else config
  options = _compute_options(config)
  obj = Objective(method=config.method,
                  schedule=diffusion.make_schedule(net_config.diffusion),
                  operator=operators.make_operator(config.operator),
                  ema_decay=float(config.optim.ema_decay),
                  score_net=_score_net(net_config, channels, options))
  if config.method not in FLOW_METHODS:
    return obj
  am = config.amortized
  return dataclasses.replace(
      obj, flow=flow_lib.flow_from_config(config.flow, **options),
      prior="diffusion" if config.method == "flowdiff" else am.prior,
      beta_data=float(am.beta_data), beta_prior=float(am.beta_prior),
      beta_ent=float(am.beta_ent), beta_prior_warmup_steps=int(am.beta_prior_warmup_steps),
      beta_ent_init=float(am.beta_ent_init), beta_ent_anneal_steps=int(am.beta_ent_anneal_steps),
      num_flow_samples=int(am.num_flow_samples), num_time_samples=int(am.num_time_samples),
      time_sampling=am.time_sampling, prior_gradient=am.prior_gradient,
      residual=bool(config.flow.residual))


def _images_shape(batch: Batch) -> tuple[int, int, int]:
  return (batch["x"] if "x" in batch else batch["y"]).shape[1:]


def _init_flow(obj: Objective, rng: jax.Array, batch: Batch) -> Any:
  """Flow variables; ActNorm initialises on the batch's observations."""
  op = obj.operator
  cond = flow_lib.conditioning_input(op, batch["y"], batch["omega"])
  # ActNorm initialises on the first batch of what the flow models: x − A⁺y
  # with the residual base, else images near A⁺y.
  pinv = op.pinv(batch["y"], batch["omega"])
  noise_rng, init_rng = jax.random.split(rng)
  spread = 0.1 * jax.random.normal(noise_rng, pinv.shape)  # a guess of the posterior's scale
  target = spread if obj.residual else pinv + spread
  return obj.flow.init(init_rng, target, cond)


def _init_score(obj: Objective, rng: jax.Array, shape: tuple[int, int, int]) -> Any:
  x = jnp.zeros((1, *shape), jnp.float32)
  return obj.score_net.init(rng, x, jnp.zeros((1,)), train=False)["params"]


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
    params = {"flow": _init_flow(obj, rng, sample_batch), "prior": prior_params}
    tx = optax.multi_transform(
        {"flow": make_optimizer(config.flow_optim), "prior": optax.set_to_zero()},
        {"flow": "flow", "prior": "prior"})
  elif config.method == "flowdiff":
    flow_rng, score_rng = jax.random.split(rng)
    params = {"flow": _init_flow(obj, flow_rng, sample_batch),
              "score": _init_score(obj, score_rng, shape)}
    score_every = int(config.flowdiff.flow_updates_per_score_update)
    tx = optax.multi_transform(
        {"flow": make_optimizer(config.flow_optim),
         "score": make_optimizer(config.optim, every_k_steps=score_every)},
        {"flow": "flow", "score": "score"})
  else:
    params = {"score": _init_score(obj, rng, shape)}
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


def prior_log_prob(obj: Objective, prior_params: Any, rng: jax.Array, *,
                   axis_name: str | None = None):
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
  return losses.diffusion_log_prob(
      _eps_fn(obj, prior_params), obj.schedule, rng, num_time_samples=obj.num_time_samples,
      time_sampling=obj.time_sampling, gradient=obj.prior_gradient, axis_name=axis_name)


def _mean(x: jax.Array, axis_name: str | None) -> jax.Array:
  x = jnp.mean(x)
  return x if axis_name is None else jax.lax.pmean(x, axis_name)


def make_loss_fn(obj: Objective, batch: Batch, step: jax.Array, rng: jax.Array,
                 axis_name: str | None = None):
  """The method's loss as a function of all params: params -> (loss, terms).

  `rng` is the step's key (the root key with the step folded in); `step` sets
  the β schedules. terms are per-dimension scalars (see `train_step`). Its
  gradient is what `train_step` applies, before averaging over `axis_name`.
  """
  loss_rng, dropout_rng = jax.random.split(rng)

  def make_eps_fn(score_params, train):
    return _eps_fn(obj, score_params, train=train, dropout_rng=dropout_rng)

  if obj.method == "flowdiff":
    weights = obj.loss_weights(step)

    def loss_fn(params):
      loss, terms = losses.flowdiff_loss(
          obj.flow, params["flow"], make_eps_fn, params["score"], obj.schedule, loss_rng,
          batch["y"], batch["omega"], obj.operator, num_samples=obj.num_flow_samples,
          residual=obj.residual, num_time_samples=obj.num_time_samples,
          time_sampling=obj.time_sampling, prior_gradient=obj.prior_gradient,
          axis_name=axis_name, **weights)
      return loss, {**terms, **weights}
  elif obj.method == "amortized":
    weights = obj.loss_weights(step)

    def loss_fn(params):
      flow_rng, prior_rng = jax.random.split(loss_rng)
      loss, terms = losses.amortized_flow_loss(
          obj.flow, params["flow"], flow_rng, batch["y"], batch["omega"], obj.operator,
          prior_log_prob(obj, params["prior"], prior_rng, axis_name=axis_name),
          num_samples=obj.num_flow_samples, residual=obj.residual, axis_name=axis_name,
          **weights)
      return loss, {**terms, **weights}
  else:
    x = _dsm_input(obj, batch)

    def loss_fn(params):
      loss = jnp.mean(diffusion.dsm_loss(make_eps_fn(params["score"], True), obj.schedule, x,
                                         loss_rng, axis_name=axis_name))
      return loss, {"dsm_loss": loss}
  return loss_fn


def _device_varying(tree: Any, axis_name: str) -> Any:
  """Marks replicated leaves as varying over `axis_name` (a no-op for the values).

  Under shard_map, autodiff sums the gradient of a replicated input over the
  axis by itself; the gradient of a varying copy is this device's own, as
  under pmap, so the explicit pmean below gives the mean in both.
  """
  def cast(x):
    if axis_name in getattr(jax.typeof(x), "vma", frozenset()):
      return x
    return jax.lax.pcast(x, axis_name, to="varying")
  return jax.tree.map(cast, tree)


def train_step(state: TrainState, batch: Batch, rng: jax.Array, *,
               axis_name: str | None = None) -> tuple[TrainState, Metrics]:
  """One update of every network the method trains.

  Args:
    state: the current TrainState.
    batch: {"x": [B, H, W, C]} for "clean"; {"y": [B, H, W, C], "omega": {...}}
      for the methods that see only corrupted data; images in [-1, 1].
    rng: the run's root training key (the step index is folded in here).
    axis_name: name of a mapped axis (shard_map / pmap) to average gradients
      and metrics over; None under jit, where the batch is global.

  Returns:
    The new state and scalar metrics, averaged over the global batch, all
    prefixed "train/". Losses are per dimension (nats for likelihood terms):
      clean/naive: dsm_loss (squared ε error), grad_norm;
      amortized: data_fidelity, prior_nll, log_q, loss, the β weights in use,
        prior_nll_bpd and posterior_entropy_bpd (bits/dim, `losses.bits_per_dim`),
        grad_norm;
      flowdiff: the amortized terms plus dsm_loss (the score network on the
        flow's samples), flow_loss, loss (the sum), grad_norm_flow and
        grad_norm_score.
    Gradient norms are of the averaged gradient, before clipping.
    update_skipped: 1.0 when the update was not applied because a loss term
      or the gradient was not finite (NaN/inf, or a gradient norm beyond
      float32's range); params, opt_state and ema_params are then
      returned unchanged, and step still advances (the next call takes the
      next key); else 0.0. The training program stops after
      training.max_consecutive_nonfinite_steps such steps in a row.
  """
  obj = state.objective
  rng = jax.random.fold_in(rng, state.step)
  loss_fn = make_loss_fn(obj, batch, state.step, rng, axis_name)
  params = state.params if axis_name is None else _device_varying(state.params, axis_name)
  (_, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
  if axis_name is not None:
    grads, terms = jax.lax.pmean((grads, terms), axis_name)
  metrics = {f"train/{k}": v for k, v in terms.items()}
  if obj.method == "flowdiff":
    metrics["train/grad_norm_flow"] = optax.global_norm(grads["flow"])
    metrics["train/grad_norm_score"] = optax.global_norm(grads["score"])
  else:
    metrics["train/grad_norm"] = optax.global_norm(grads)
  # One NaN or inf would spread into the params, Adam's moments and the EMA
  # for good, so such an update is dropped whole. The check runs on device (no
  # host sync) on values already averaged over `axis_name`, so every device
  # and every form of the step makes the same choice. A gradient norm is
  # finite iff every element is (short of overflow), and the norms exist
  # already (a flag per array would be a thousand-operand reduction, slow to
  # compile); from finite, clipped gradients AdamW's update is finite too.
  ok = functools.reduce(jnp.logical_and, [jnp.isfinite(v) for v in metrics.values()])

  def update(params, ema_params, opt_state):
    updates, opt_state = state.tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    return params, optax.incremental_update(params, ema_params, 1.0 - obj.ema_decay), opt_state

  # A cond, not a select per array: as cheap to compile as the plain update.
  params, ema_params, opt_state = jax.lax.cond(
      ok, update, lambda *old: old, state.params, state.ema_params, state.opt_state)
  new_state = state.replace(step=state.step + 1, params=params,
                            ema_params=ema_params, opt_state=opt_state)
  metrics["train/update_skipped"] = 1.0 - ok.astype(jnp.float32)
  if obj.method in FLOW_METHODS:
    metrics["train/prior_nll_bpd"] = losses.bits_per_dim(terms["prior_nll"])
    metrics["train/posterior_entropy_bpd"] = losses.bits_per_dim(-terms["log_q"])
  return new_state, metrics


def train_steps(state: TrainState, batches: Batch, rng: jax.Array, *,
                axis_name: str | None = None) -> tuple[TrainState, Metrics]:
  """K consecutive `train_step`s in one call: a `lax.scan` over the batches' leading axis.

  Args:
    state, rng, axis_name: as in `train_step`.
    batches: K batches of `train_step` stacked on a new leading axis:
      {"x": [K, B, H, W, C]} or {"y": [K, B, H, W, C], "omega": {leaves [K, B, ...]}}.

  Returns:
    The state after the K updates, and the metrics of `train_step` for each of
    the K steps, stacked: every value [K], in step order.

  Each step folds its own `state.step` into `rng`, so the result is that of K
  calls of `train_step` up to float rounding: XLA fuses the loop body
  differently from a lone step, and some float32 reductions round otherwise
  (~1e-7 relative; tests/test_perf_options.py). One dispatch instead of K
  saves the per-call host overhead, which matters when a step takes a few
  milliseconds.

  The scan is unrolled: XLA:CPU ran the body of a rolled loop (a while loop)
  6.5x slower than the same step alone (quickstart clean step, batch 8: 988
  vs 151 ms per step; unrolled 138 ms). The price is compile time, about K
  times a step's, so K is meant to be small.
  """
  body = functools.partial(train_step, rng=rng, axis_name=axis_name)
  return jax.lax.scan(lambda s, batch: body(s, batch), state, batches, unroll=True)


def posterior_samples(state: TrainState, batch: Batch, rng: jax.Array,
                      num_samples: int, *, axis_name: str | None = None) -> jax.Array:
  """Draws [num_samples, B, H, W, C] from the flow's q(x | y, ω) ("amortized", "flowdiff").

  The flow's current params are used: the EMA (decay tuned for the score
  network's long runs) would lag a flow trained for a few thousand steps.
  """
  obj = state.objective
  y, omega = batch["y"], batch["omega"]
  cond = flow_lib.conditioning_input(obj.operator, y, omega)
  base = obj.operator.pinv(y, omega) if obj.residual else None
  x, _ = flow_lib.sample(obj.flow, state.params["flow"], rng, cond, num_samples, base=base,
                         axis_name=axis_name)
  return x


def eval_step(state: TrainState, batch: Batch, rng: jax.Array, *,
              axis_name: str | None = None, num_posterior_samples: int = 16,
              nll_time_samples: int = 1) -> Metrics:
  """Held-out metrics; `batch` has "y", "omega" and, where clean images exist, "x" ([B, H, W, C]).

  Methods with a trained score network ("clean", "naive", "flowdiff"), using
  its EMA params, on the *clean* held-out images (comparable across methods:
  how well each prior fits clean data; only with "x"):
    eval/dsm_loss_clean: the DSM loss (squared ε error per dimension);
    eval/nll_bpd_clean: the diffusion ELBO bound on −log p(x) in bits/dim
      (`losses.bits_per_dim`), `nll_time_samples` draws per image.
  Methods with a flow ("amortized", "flowdiff"), from `num_posterior_samples`
  flow samples; without ground truth:
    eval/residual_ratio: ‖y − A x‖² / (m σ_y²) of the samples
      (`operators.residual_ratio`): ≈ 1 for a calibrated posterior;
    eval/residual_ratio_mean: the same of the posterior mean (below 1);
    eval/posterior_std: the mean per-pixel posterior std;
  and with "x": PSNR (dB, images in [-1, 1]) against the clean images of the
  posterior mean (eval/psnr_posterior_mean), of the observation y and of A⁺y.
  """
  obj = state.objective
  x = batch.get("x")
  metrics = {}
  if obj.method in SCORE_METHODS and x is not None:
    dsm_rng, nll_rng = jax.random.split(jax.random.fold_in(rng, 0))
    eps_fn = _eps_fn(obj, state.ema_params["score"])
    dsm = diffusion.dsm_loss(eps_fn, obj.schedule, x, dsm_rng, axis_name=axis_name)
    nll = diffusion.nll_bound(eps_fn, obj.schedule, x, nll_rng,
                              num_time_samples=nll_time_samples, axis_name=axis_name)
    metrics["eval/dsm_loss_clean"] = _mean(dsm, axis_name)
    metrics["eval/nll_bpd_clean"] = _mean(
        losses.bits_per_dim(nll / math.prod(x.shape[1:])), axis_name)
  if obj.method in FLOW_METHODS:
    samples = posterior_samples(state, batch, jax.random.fold_in(rng, 1),
                                num_posterior_samples, axis_name=axis_name)
    mean, std = jnp.mean(samples, axis=0), jnp.std(samples, axis=0)
    y, omega = batch["y"], batch["omega"]
    metrics.update({
        "eval/residual_ratio": _mean(operators.residual_ratio(obj.operator, y, omega, samples),
                                     axis_name),
        "eval/residual_ratio_mean": _mean(operators.residual_ratio(obj.operator, y, omega, mean),
                                          axis_name),
        "eval/posterior_std": _mean(std, axis_name)})
    if x is not None:
      pinv = obj.operator.pinv(y, omega)
      metrics.update({
          "eval/psnr_posterior_mean": _mean(evaluation.psnr(mean, x), axis_name),
          "eval/psnr_observation": _mean(evaluation.psnr(y, x), axis_name),
          "eval/psnr_pinv": _mean(evaluation.psnr(pinv, x), axis_name)})
  return metrics


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


def stacked_batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
  """K stacked batches [K, B, ...] (`train_steps`): the batch axis split over "data"."""
  return NamedSharding(mesh, P(None, "data"))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def _check_batch_splits(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> None:
  for field, size in (("training.batch_size", config.training.batch_size),
                      ("eval.batch_size", config.eval.batch_size)):
    if size % mesh.size:
      raise ValueError(f"config.{field}={size} does not split over the mesh's {mesh.size} "
                       f"devices; allowed: multiples of {mesh.size}")


def make_train_step(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh):
  """`train_step` jitted over `mesh`: batch sharded on "data", state replicated and donated.

  Returns a function (state, batch, rng) -> (state, metrics) for global arrays
  (`batch_sharding(mesh)` for the batch, `replicated(mesh)` for the rest). The
  state passed in is donated: use the returned one.
  """
  _check_batch_splits(config, mesh)
  rep, data = replicated(mesh), batch_sharding(mesh)
  return jax.jit(train_step, in_shardings=(rep, data, rep), out_shardings=(rep, rep),
                 donate_argnums=0)


def make_train_steps(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh):
  """`train_steps` jitted over `mesh`: several steps per dispatch (training.steps_per_dispatch).

  Returns a function (state, batches, rng) -> (state, metrics) where `batches`
  holds K batches stacked on a leading axis (`stacked_batch_sharding(mesh)`)
  and every metric is [K]; K is read from the batches' shape (one compilation
  per K). The state passed in is donated: use the returned one.
  """
  _check_batch_splits(config, mesh)
  rep = replicated(mesh)
  return jax.jit(train_steps, in_shardings=(rep, stacked_batch_sharding(mesh), rep),
                 out_shardings=(rep, rep), donate_argnums=0)


def make_eval_step(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh):
  """`eval_step` jitted over `mesh`, with the config's posterior and NLL sample counts."""
  _check_batch_splits(config, mesh)
  rep, data = replicated(mesh), batch_sharding(mesh)
  step = functools.partial(eval_step, num_posterior_samples=config.amortized.eval_num_samples,
                           nll_time_samples=config.eval.nll_time_samples)
  return jax.jit(step, in_shardings=(rep, data, rep), out_shardings=rep)
