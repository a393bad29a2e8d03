"""What every method shares: the static `Objective`, the `Method` interface, network builders.

A method (docs/design.md §2.6) says which batch fields it reads, which
networks it trains and how they start, how its optimiser is partitioned over
them, its loss as named terms, its metrics, and what it can sample. The
generic update (`flowdiff_jax.step.train_step`) asks it for those and does
the rest: gradient, mean over devices, the non-finite skip, the update, the
EMA. A new method is one module with a `Method` subclass plus a line in the
registry (`flowdiff_jax.methods`).
"""

from __future__ import annotations

from collections.abc import Callable
import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from flowdiff_jax import (
  configcheck,
  diffusion,
  evaluation,
  gaussian_em,
  losses,
  operators,
  sampling,
)
from flowdiff_jax.models import flow as flow_lib, gaussian, unet

Batch = dict[str, Any]
Metrics = dict[str, jax.Array]
# params -> (loss, {term name: scalar}), the function whose gradient a step applies.
LossFn = Callable[[Any], tuple[jax.Array, Metrics]]

# Score-network families (config.model.name): the DDPM U-Net, or the exact
# ε-network of a Gaussian (for the Gaussian oracle; small images only).
SCORE_MODELS = ("unet", "gaussian")


@dataclasses.dataclass(frozen=True)
class Objective:
  """Everything static that defines what a step optimises (hashable, so jit-static).

  Attributes:
    method: the registry name of the method (`flowdiff_jax.methods.get`).
    schedule: the diffusion schedule (of the prior run, for "amortized").
    operator: the forward operator A_ω with its σ_y.
    ema_decay: decay of the parameter EMA.
    score_net: the ε-prediction network (the frozen prior's, for "amortized").
    flow: the conditional flow q_φ(x | y, ω) (methods with a posterior).
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
    residual: the flow models x − x̂₀(y) rather than x.
    flow_base: the flow's restoration x̂₀(y) (conditioning image and residual
      base): "pinv" (A⁺y) or "gaussian_em" (the posterior mean of a Gaussian
      fitted to the training observations, held in params["gaussian_em"]).
    gaussian_prior_steps, handover_steps: "flowdiff" only: the flow's prior
      term is the fitted Gaussian's log-density (params["gaussian_em_prior"])
      for the first gaussian_prior_steps steps, then moves linearly to the
      diffusion prior's bound over handover_steps (`prior_handover`); both 0:
      the diffusion prior throughout.
    shared_score_pass: "flowdiff" only: the flow's prior bound and the DSM
      loss share one score-network pass (`diffusion.nll_bound_and_dsm`).
    posterior_params: which flow params draw the posterior samples of
      evaluation, export and the grids: "params" (the current ones) or "ema"
      (their EMA, decay ema_decay); training always uses the current ones.
  """
  method: str
  schedule: diffusion.VPSchedule
  operator: operators.Operator
  ema_decay: float
  score_net: Any
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
  flow_base: str = "pinv"
  gaussian_prior_steps: int = 0
  handover_steps: int = 0
  shared_score_pass: bool = False
  posterior_params: str = "params"

  @property
  def gaussian_prior(self) -> bool:
    """Whether the flow's prior term starts as the fitted Gaussian (the hand-over)."""
    return self.gaussian_prior_steps + self.handover_steps > 0

  def prior_handover(self, step: jax.Array) -> jax.Array:
    """The diffusion prior's weight w in the flow's prior term at `step`, in [0, 1].

    log p(x) = (1 − w) log N(x; μ̂, Σ̂) + w (diffusion bound): 0 for the first
    gaussian_prior_steps steps, then rising linearly to 1 over handover_steps.
    """
    if not self.gaussian_prior:
      return jnp.float32(1.0)
    if not self.handover_steps:
      return jnp.where(step < self.gaussian_prior_steps, 0.0, 1.0).astype(jnp.float32)
    ramp = optax.linear_schedule(0.0, 1.0, self.handover_steps,
                                 transition_begin=self.gaussian_prior_steps)
    return jnp.asarray(ramp(step), jnp.float32)

  def loss_weights(self, step: jax.Array) -> dict[str, jax.Array]:
    """β_data, β_prior, β_ent at `step` (the number of updates applied so far)."""
    def ramp(start, end, steps):
      return optax.linear_schedule(start, end, steps)(step)
    return {"beta_data": jnp.float32(self.beta_data),
            "beta_prior": (ramp(0.0, self.beta_prior, self.beta_prior_warmup_steps)
                           if self.beta_prior_warmup_steps else jnp.float32(self.beta_prior)),
            "beta_ent": (ramp(self.beta_ent_init, self.beta_ent, self.beta_ent_anneal_steps)
                         if self.beta_ent_anneal_steps else jnp.float32(self.beta_ent))}


class Method:
  """The interface of a method; subclasses override what differs.

  Attributes:
    name: the `config.method` value.
    inputs: the batch fields the step reads (the training program drops the
      others): ("x",) for clean images, ("y", "omega") for observations.
    has_posterior: trains a conditional flow (posterior samples, export).
    has_prior: trains a score network (prior samples, generation metrics).
    frozen_prior: its params hold, under "prior", a prior it does not train
      (passed to `init_params` as `prior_params`: another run's score network,
      or a Gaussian).
  """
  name: str = ""
  inputs: tuple[str, ...] = ("y", "omega")
  has_posterior: bool = False
  has_prior: bool = False
  frozen_prior: bool = False

  # -- configuration -------------------------------------------------------

  def validate(self, config: ml_collections.ConfigDict) -> None:
    """Checks the method's own config fields (`flowdiff_jax.configcheck`)."""

  def clean_images_needed(self, config: ml_collections.ConfigDict) -> tuple[str, str] | None:
    """(field, why) when this run needs clean training images, else None.

    Measurements in files have none, so `validate` refuses such a run there.
    """
    del config
    return None

  # -- networks, parameters, optimiser --------------------------------------

  def objective(self, config: ml_collections.ConfigDict, channels: int,
                prior_config: ml_collections.ConfigDict | None = None) -> Objective:
    """The static networks and loss settings; `prior_config`: of a frozen prior's run."""
    return base_objective(config, channels, prior_config)

  def init_params(self, obj: Objective, config: ml_collections.ConfigDict, rng: jax.Array,
                  batch: Batch, prior_params: Any = None,
                  fitted_params: dict[str, Any] | None = None) -> dict[str, Any]:
    """The trained (and frozen) parameters, keyed by network.

    fitted_params: what `fit_params` computed from the training observations
    before training (None when the method needs nothing of the kind).
    """
    raise NotImplementedError

  def fitted_params_shapes(self, config: ml_collections.ConfigDict,
                           image_shape: tuple[int, int, int]) -> dict[str, Any] | None:
    """Shapes (jax.ShapeDtypeStruct) of the params fitted before training; None: none.

    The training program and `runs.load_run` build templates from them to
    restore a checkpoint without fitting again.
    """
    del config, image_shape
    return None

  def fit_params(self, config: ml_collections.ConfigDict,
                 observations: Callable[[int], tuple[jax.Array, Any]],
                 mesh: jax.sharding.Mesh | None = None) -> dict[str, Any] | None:
    """Params fitted to the training observations before training.

    observations(max_examples) gives them: (y [N, H, W, C], omega), the first
    max_examples (0: all; `data.RunData.observations`). Clean images never.
    """
    del config, observations, mesh
    return None

  def optimizer(self, config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """One transform per top-level key of the params (optax.multi_transform)."""
    raise NotImplementedError

  def batch_source(self, config: ml_collections.ConfigDict, run_data, mesh: jax.sharding.Mesh,
                   workdir: str) -> Any:
    """Where the training steps' batches come from: None, the training set (`data.RunData`).

    Otherwise an object the training program asks, before each dispatch,
    `needs_e_step(step)` (then runs `e_step(state, step, should_stop)`, which
    returns its metrics, or None when stopped part-way), and whose
    `batch(step)` is the batch of the update step -> step + 1: e.g. the EM
    method's posterior samples (`flowdiff_jax.methods.em.Laps`).
    """
    del config, run_data, mesh, workdir
    return None

  # -- the step --------------------------------------------------------------

  def loss_fn(self, obj: Objective, batch: Batch, step: jax.Array, rng: jax.Array,
              axis_name: str | None = None) -> LossFn:
    """params -> (loss, terms); terms are per-dimension scalars."""
    raise NotImplementedError

  def grad_metrics(self, grads: Any) -> Metrics:
    """Norms of the averaged gradient, before clipping."""
    return {"train/grad_norm": optax.global_norm(grads)}

  def step_metrics(self, terms: Metrics) -> Metrics:
    """Metrics derived from the loss terms (e.g. in bits per dimension)."""
    del terms
    return {}

  def eval_metrics(self, state, batch: Batch, rng: jax.Array, *, axis_name: str | None = None,
                   num_posterior_samples: int = 16, nll_time_samples: int = 1) -> Metrics:
    """Held-out metrics of `flowdiff_jax.step.eval_step`."""
    raise NotImplementedError

  # -- what it can sample ----------------------------------------------------

  def diffusion_prior_params(self, state) -> Any:
    """The ε-network params of the run's diffusion prior (for sampling and inverse problems)."""
    raise ValueError(f"The run (method {self.name!r}) has no diffusion prior.")


# ----------------------------------------------------------------------------
# Building blocks the methods share.
# ----------------------------------------------------------------------------


def make_optimizer(optim: ml_collections.ConfigDict,
                   every_k_steps: int = 1) -> optax.GradientTransformation:
  """AdamW with linear warm-up, optional cosine decay and global-norm clipping.

  optim.decay_steps > 0: after the warm-up the learning rate falls along a
  cosine to 0 at update decay_steps (counted from the first update, warm-up
  included) and stays there; 0: constant after the warm-up.
  every_k_steps > 1 averages the gradients of k consecutive steps and updates
  once (optax.MultiSteps); in between the params and the optimiser state stay
  as they are. The schedules count updates, so steps / k of them.
  """
  decay = int(optim.get("decay_steps", 0))
  if decay:
    lr = optax.warmup_cosine_decay_schedule(0.0, optim.learning_rate, optim.warmup_steps,
                                            decay, end_value=0.0)
  elif optim.warmup_steps:
    lr = optax.linear_schedule(0.0, optim.learning_rate, optim.warmup_steps)
  else:
    lr = optim.learning_rate
  parts = []
  if optim.grad_clip_norm > 0:
    parts.append(optax.clip_by_global_norm(optim.grad_clip_norm))
  parts.append(optax.adamw(lr, b1=optim.b1, b2=optim.b2, eps=optim.eps,
                           weight_decay=optim.weight_decay))
  tx = optax.chain(*parts)
  if every_k_steps > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=every_k_steps).gradient_transformation()
  return tx


def partitioned(transforms: dict[str, optax.GradientTransformation]
                ) -> optax.GradientTransformation:
  """One transform per network: the params' top-level keys are the labels."""
  return optax.multi_transform(transforms, {key: key for key in transforms})


def compute_options(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The networks' compute dtype and remat flag (model.compute_dtype, training.remat).

  Configs written before these fields existed get the defaults (float32, no remat).
  """
  name = str(config.model.get("compute_dtype", "float32"))
  if name not in unet.COMPUTE_DTYPES:
    raise ValueError(f"config.model.compute_dtype={name!r}: unknown value; allowed: "
                     f"{', '.join(unet.COMPUTE_DTYPES)}")
  return {"dtype": unet.COMPUTE_DTYPES[name],
          "remat": bool(config.training.get("remat", False))}


def score_net(net_config: ml_collections.ConfigDict, channels: int, options: dict[str, Any]):
  """The score network of `net_config`, computing as `options` (`compute_options`) say."""
  name = net_config.model.get("name", "unet")
  if name == "gaussian":
    return gaussian.GaussianScore(schedule=diffusion.make_schedule(net_config.diffusion))
  # The time embedding sees t * T, as DDPM's network saw its integer steps.
  return unet.unet_from_config(net_config.model, channels=channels).clone(
      time_scale=float(net_config.diffusion.num_timesteps), **options)


def base_objective(config: ml_collections.ConfigDict, channels: int,
                   prior_config: ml_collections.ConfigDict | None = None) -> Objective:
  """The fields every method has; the score net and schedule from `prior_config` if given
  (its compute dtype and remat from `config`: they do not change the parameters)."""
  net_config = prior_config if prior_config is not None else config
  return Objective(method=config.method,
                   schedule=diffusion.make_schedule(net_config.diffusion),
                   operator=operators.make_operator(config.operator),
                   ema_decay=float(config.optim.ema_decay),
                   score_net=score_net(net_config, channels, compute_options(config)))


def flow_objective(obj: Objective, config: ml_collections.ConfigDict, prior: str) -> Objective:
  """`obj` with the conditional flow and the amortized loss settings of `config`."""
  am = config.amortized
  return dataclasses.replace(
      obj, flow=flow_lib.flow_from_config(config.flow, **compute_options(config)), prior=prior,
      beta_data=float(am.beta_data), beta_prior=float(am.beta_prior),
      beta_ent=float(am.beta_ent), beta_prior_warmup_steps=int(am.beta_prior_warmup_steps),
      beta_ent_init=float(am.beta_ent_init), beta_ent_anneal_steps=int(am.beta_ent_anneal_steps),
      num_flow_samples=int(am.num_flow_samples), num_time_samples=int(am.num_time_samples),
      time_sampling=am.time_sampling, prior_gradient=am.prior_gradient,
      residual=bool(config.flow.residual), flow_base=str(config.flow.get("base", "pinv")),
      posterior_params=str(am.get("posterior_params", "params")))


POSTERIOR_PARAMS = ("params", "ema")


def posterior_params(obj: Objective, params: dict[str, Any], ema_params: dict[str, Any]
                     ) -> dict[str, Any]:
  """The params the posterior is drawn with: `params`, its "flow" taken from
  `ema_params` when obj.posterior_params is "ema" (the fitted Gaussian and
  the score network stay as given: the flow's draws do not use them, or they
  are fixed)."""
  if obj.posterior_params == "ema":
    return {**params, "flow": ema_params["flow"]}
  return params


# ----------------------------------------------------------------------------
# The flow's restoration x̂₀(y), and its Gaussian-EM warm start.
# ----------------------------------------------------------------------------

# config.flow.base values; the params keys of the fitted Gaussian's restorer and
# of its log-density (flowdiff's prior hand-over).
FLOW_BASES = ("pinv", "gaussian_em")
GAUSSIAN_KEY = "gaussian_em"
GAUSSIAN_PRIOR_KEY = "gaussian_em_prior"


def _gaussian_base(config: ml_collections.ConfigDict) -> bool:
  return config.flow.get("base", "pinv") == "gaussian_em"


def gaussian_handover(config: ml_collections.ConfigDict) -> bool:
  """flowdiff's prior term starts as the fitted Gaussian (flowdiff.gaussian_prior_steps /
  handover_steps)."""
  fd = config.get("flowdiff", {})
  return config.method == "flowdiff" and (fd.get("gaussian_prior_steps", 0)
                                          + fd.get("handover_steps", 0)) > 0


def validate_flow_base(config: ml_collections.ConfigDict) -> None:
  """config.flow.base and, for "gaussian_em", the fit's settings and the operator."""
  configcheck.choice(config, "flow.base", FLOW_BASES)
  if not _gaussian_base(config):
    return
  for field in ("num_iters", "batch_size"):
    configcheck.positive(config, f"gaussian_em.{field}", integer=True)
  configcheck.positive(config, "gaussian_em.init_var")
  rank = config.gaussian_em.rank
  if not isinstance(rank, int) or rank < 0:
    configcheck.fail("gaussian_em.rank", rank, "must be an integer >= 0 (0: a dense Σ)")
  op = operators.make_operator(config.operator)
  if not op.sigma_y > 0:
    configcheck.fail("operator.sigma_y", op.sigma_y, "flow.base='gaussian_em' needs σ_y > 0")
  try:
    gaussian_em.restorer_shapes(op, (1, 1, 1), rank or None)
  except NotImplementedError as e:
    configcheck.fail("gaussian_em.rank", rank, str(e))


def flow_base_shapes(config: ml_collections.ConfigDict,
                     image_shape: tuple[int, int, int]) -> dict[str, Any] | None:
  """{"gaussian_em": restorer shapes} when the flow's base is fitted, else None."""
  if not _gaussian_base(config):
    return None
  op = operators.make_operator(config.operator)
  rank = int(config.gaussian_em.rank) or None
  shapes = {GAUSSIAN_KEY: gaussian_em.restorer_shapes(op, image_shape, rank)}
  if gaussian_handover(config):
    shapes[GAUSSIAN_PRIOR_KEY] = gaussian_em.log_density_shapes(image_shape, rank)
  return shapes


def fit_flow_base(config: ml_collections.ConfigDict,
                  observations: Callable[[int], tuple[jax.Array, Any]],
                  mesh: jax.sharding.Mesh | None = None) -> dict[str, Any] | None:
  """{"gaussian_em": restorer params} of N(μ, Σ) fitted by EM to the observations,
  and {"gaussian_em_prior": its log-density's params} for flowdiff's prior hand-over."""
  if not _gaussian_base(config):
    return None
  gem = config.gaussian_em
  op = operators.make_operator(config.operator)
  y, omega = observations(int(gem.max_examples))
  fit = gaussian_em.fit(op, y, omega, num_iters=int(gem.num_iters), rank=int(gem.rank) or None,
                        init_var=float(gem.init_var), batch_size=int(gem.batch_size),
                        mesh=mesh, seed=int(config.seed))
  fitted = {GAUSSIAN_KEY: gaussian_em.restorer(fit, op)}
  if gaussian_handover(config):
    fitted[GAUSSIAN_PRIOR_KEY] = gaussian_em.log_density_params(fit)
  return fitted


def frozen_transforms(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """Optimiser labels of the fitted params: never updated."""
  frozen = {GAUSSIAN_KEY: optax.set_to_zero()} if _gaussian_base(config) else {}
  if gaussian_handover(config):
    frozen[GAUSSIAN_PRIOR_KEY] = optax.set_to_zero()
  return frozen


def flow_estimate(obj: Objective, params: dict[str, Any], y: jax.Array, omega) -> jax.Array:
  """x̂₀(y) [B, H, W, C]: A⁺y, or the fitted Gaussian's posterior mean (params["gaussian_em"])."""
  if obj.flow_base == "gaussian_em":
    return gaussian_em.restore(jax.lax.stop_gradient(params[GAUSSIAN_KEY]), obj.operator, y,
                               omega)
  return obj.operator.pinv(y, omega)


def images_shape(batch: Batch) -> tuple[int, int, int]:
  """(H, W, C) of the batch's images."""
  return (batch["x"] if "x" in batch else batch["y"]).shape[1:]


def init_flow(obj: Objective, rng: jax.Array, batch: Batch,
              fitted_params: dict[str, Any] | None = None) -> Any:
  """Flow variables; ActNorm initialises on the batch's observations."""
  op = obj.operator
  x_hat = flow_estimate(obj, fitted_params or {}, batch["y"], batch["omega"])
  cond = flow_lib.conditioning_input(op, batch["y"], batch["omega"], x_hat)
  # ActNorm initialises on the first batch of what the flow models: x − x̂₀
  # with the residual base, else images near x̂₀.
  noise_rng, init_rng = jax.random.split(rng)
  spread = 0.1 * jax.random.normal(noise_rng, x_hat.shape)  # a guess of the posterior's scale
  target = spread if obj.residual else x_hat + spread
  return obj.flow.init(init_rng, target, cond)


def init_score(obj: Objective, rng: jax.Array, shape: tuple[int, int, int]) -> Any:
  """Score-network params for images of `shape` (H, W, C)."""
  x = jnp.zeros((1, *shape), jnp.float32)
  return obj.score_net.init(rng, x, jnp.zeros((1,)), train=False)["params"]


def score_apply(obj: Objective) -> diffusion.ScoreApply:
  """(params, x_t [B, H, W, C], t [B], dropout key) -> ε̂ of the score network in training mode."""
  return lambda params, x_t, t, key: obj.score_net.apply(
      {"params": params}, x_t, t, train=True, rngs={"dropout": key})


def eps_fn(obj: Objective, score_params, *, train: bool = False, dropout_rng=None):
  """(x_t [B, H, W, C], t [B]) -> ε̂ of the score network with these params."""
  rngs = {"dropout": dropout_rng} if train else None
  return lambda x_t, t: obj.score_net.apply({"params": score_params}, x_t, t, train=train,
                                            rngs=rngs)


def global_mean(x: jax.Array, axis_name: str | None) -> jax.Array:
  """The mean of `x`, over the mapped axis too when there is one."""
  x = jnp.mean(x)
  return x if axis_name is None else jax.lax.pmean(x, axis_name)


def flow_samples(obj: Objective, params: dict[str, Any], batch: Batch, rng: jax.Array,
                 num_samples: int, *, axis_name: str | None = None) -> jax.Array:
  """[num_samples, B, H, W, C] from the flow's q(x | y, ω).

  params: the method's params ({"flow", ...}; "gaussian_em" with that base).
  """
  y, omega = batch["y"], batch["omega"]
  x_hat = flow_estimate(obj, params, y, omega)
  cond = flow_lib.conditioning_input(obj.operator, y, omega, x_hat)
  x, _ = flow_lib.sample(obj.flow, params["flow"], rng, cond, num_samples,
                         base=x_hat if obj.residual else None, axis_name=axis_name)
  return x


def posterior_metrics(obj: Objective, params: dict[str, Any], batch: Batch, rng: jax.Array, *,
                      num_samples: int, axis_name: str | None = None) -> Metrics:
  """The flow's held-out metrics (see `flowdiff_jax.step.eval_step`); params as `flow_samples`."""
  samples = flow_samples(obj, params, batch, rng, num_samples, axis_name=axis_name)
  mean, std = sampling.posterior_summary(samples)
  y, omega, x = batch["y"], batch["omega"], batch.get("x")
  metrics = {
      "eval/residual_ratio": global_mean(
          operators.residual_ratio(obj.operator, y, omega, samples), axis_name),
      "eval/residual_ratio_mean": global_mean(
          operators.residual_ratio(obj.operator, y, omega, mean), axis_name),
      "eval/posterior_std": global_mean(std, axis_name)}
  if x is not None:
    pinv = obj.operator.pinv(y, omega)
    metrics.update({
        "eval/psnr_posterior_mean": global_mean(evaluation.psnr(mean, x), axis_name),
        "eval/psnr_observation": global_mean(evaluation.psnr(y, x), axis_name),
        "eval/psnr_pinv": global_mean(evaluation.psnr(pinv, x), axis_name)})
    if obj.flow_base != "pinv":
      metrics["eval/psnr_flow_base"] = global_mean(
          evaluation.psnr(flow_estimate(obj, params, y, omega), x), axis_name)
  return metrics


def tweedie_applies(op: operators.Operator, schedule: diffusion.VPSchedule) -> bool:
  """Whether `sampling.tweedie_posterior_mean` serves op: denoising, σ_y within the schedule."""
  lo, hi = sampling.tweedie_noise_range(schedule)
  return isinstance(op, operators.Denoise) and lo <= op.sigma_y <= hi


def prior_fit_metrics(obj: Objective, score_params: Any, x: jax.Array, rng: jax.Array, *,
                      nll_time_samples: int, axis_name: str | None = None,
                      y: jax.Array | None = None) -> Metrics:
  """How well the score network fits clean images x [B, H, W, C]: DSM loss and NLL bound.

  With the observations y [B, H, W, C] of a denoising operator (σ_y within the
  schedule's noise levels), also
  eval/psnr_prior_tweedie: the PSNR of the prior's exact E[x | y] (one pass,
  `sampling.tweedie_posterior_mean`), the restoration the prior itself implies.
  """
  dsm_rng, nll_rng = jax.random.split(rng)
  eps = eps_fn(obj, score_params)
  dsm = diffusion.dsm_loss(eps, obj.schedule, x, dsm_rng, axis_name=axis_name)
  nll = diffusion.nll_bound(eps, obj.schedule, x, nll_rng, num_time_samples=nll_time_samples,
                            axis_name=axis_name)
  metrics = {"eval/dsm_loss_clean": global_mean(dsm, axis_name),
             "eval/nll_bpd_clean": global_mean(
                 losses.bits_per_dim(nll / math.prod(x.shape[1:])), axis_name)}
  if y is not None and tweedie_applies(obj.operator, obj.schedule):
    mean = sampling.tweedie_posterior_mean(eps, obj.schedule, y, obj.operator.sigma_y)
    metrics["eval/psnr_prior_tweedie"] = global_mean(evaluation.psnr(mean, x), axis_name)
  return metrics


def flow_step_metrics(terms: Metrics) -> Metrics:
  """The flow's prior NLL and posterior entropy in bits per dimension."""
  return {"train/prior_nll_bpd": losses.bits_per_dim(terms["prior_nll"]),
          "train/posterior_entropy_bpd": losses.bits_per_dim(-terms["log_q"])}
