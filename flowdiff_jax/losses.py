"""Pure loss functions (docs/design.md §2.2–2.4).

`amortized_flow_loss` is the amortized variational-inference objective of the
conditional flow: per observation (y, ω),

  L(φ) = E_z[ β_data ‖y − A_ω x‖² / (2σ_y²) − β_prior log p(x) + β_ent log q_φ(x | y, ω) ],
  x = G_φ(z; c(y, ω)),

which for β_* = 1 is KL(q_φ(· | y) ‖ p(· | y)) − log p(y) + const: minimised
exactly when the flow is the true posterior. The prior enters only through
``prior_log_prob``: the analytic log-density for the Gaussian oracle
(docs/design.md §2.8), or minus the diffusion ELBO bound of a score network.

`flowdiff_loss` is the joint FlowDiff objective of one train step,

  total = L_flow(φ; sg θ) + L_DSM(θ; sg x),

the flow's amortized loss with the score network's prior bound (θ held fixed),
plus denoising score matching of the score network on the flow's own samples
(x held fixed). One gradient of `total` gives each network exactly its own
objective's gradient.

Likelihood terms are reported per dimension, in nats and in bits per
dimension (`bits_per_dim`).
"""

from __future__ import annotations

from collections.abc import Callable
import math
from typing import Any

import jax
import jax.numpy as jnp

from flowdiff_jax import diffusion
from flowdiff_jax.models import flow as flow_lib

# Images in [-1, 1] quantised to 8 bits: a pixel bin is 2/256 wide.
_LOG2_BINS_PER_UNIT = math.log2(256 / 2)


def bits_per_dim(nats_per_dim: jax.Array) -> jax.Array:
  """Negative log-density in nats/dim on [-1, 1] -> bits/dim of 8-bit images.

  The usual image-likelihood unit: the density times the bin width 2/256 is
  the probability of the pixel's 8-bit value, so bpd = nats / ln 2 + 7.
  """
  return nats_per_dim / math.log(2.0) + _LOG2_BINS_PER_UNIT


def amortized_flow_loss(flow: flow_lib.ConditionalGlow, flow_params: Any, rng: jax.Array,
                        y: jax.Array, omega: dict, op: Any,
                        prior_log_prob: Callable[[jax.Array], jax.Array], *,
                        num_samples: int = 1, beta_data: float | jax.Array = 1.0,
                        beta_prior: float | jax.Array = 1.0,
                        beta_ent: float | jax.Array = 1.0, residual: bool = False,
                        x_hat: jax.Array | None = None,
                        axis_name: str | None = None, return_samples: bool = False,
                        prior_has_aux: bool = False):
  """Monte-Carlo amortized-inference loss of the flow, per dimension.

  Args:
    flow, flow_params: the conditional flow and its variables (from ``init``).
    rng: key for the base draws z.
    y: observations [B, H, W, C]; omega: the operator parameters, leaves [B, ...].
    op: the forward operator (static; ``op.sigma_y`` > 0 on the [-1, 1] scale).
    prior_log_prob: x [B·S, H, W, C] -> log p(x) [B·S]; any differentiable
      callable. Rows are batch-major (row b·S + s is sample s of example b),
      so a device's rows are contiguous when the batch is sharded.
    num_samples: flow samples S per observation.
    beta_data, beta_prior, beta_ent: weights of the three terms (scalars,
      possibly traced: the train step schedules them).
    residual: if True the flow models x − x̂₀.
    x_hat: the restoration x̂₀(y) [B, H, W, C] the flow is conditioned on (and,
      with `residual`, its base); op.pinv(y, omega) when None.
    axis_name: the mapped axis under shard_map/pmap (None under jit): the
      base draws are then this device's rows of the global draw.
    return_samples: also return the samples x [B·S, H, W, C] (batch-major).
    prior_has_aux: prior_log_prob returns (log p(x) [B·S], aux), aux a dict of
      scalars that is added to the terms as it is.
  Returns:
    (loss, terms), or (loss, terms, x). Every value is averaged over samples and
    batch and divided by D = H·W·C (nats per dimension):
    terms["data_fidelity"] = ‖y − Ax‖²/(2σ_y² D), terms["prior_nll"] = −log p(x)/D,
    terms["log_q"] = log q(x | y)/D, and
    terms["loss"] = loss = β_data·data_fidelity + β_prior·prior_nll + β_ent·log_q.
    Gradients reach flow_params through both the samples x and log q.
  """
  sigma_y = float(op.sigma_y)
  if not sigma_y > 0:
    raise ValueError(f"operator.sigma_y must be > 0 for the flow's data term, got {sigma_y}")
  b = y.shape[0]
  dims = y.shape[1] * y.shape[2] * y.shape[3]
  x_hat = op.pinv(y, omega) if x_hat is None else x_hat
  cond = flow_lib.conditioning_input(op, y, omega, x_hat)
  base = x_hat if residual else None
  x, log_q = flow_lib.sample(flow, flow_params, rng, cond, num_samples, base=base,
                             axis_name=axis_name)
  # [S, B, ...] -> batch-major [B·S, ...].
  x = jnp.swapaxes(x, 0, 1).reshape((b * num_samples,) + y.shape[1:])
  log_q = jnp.swapaxes(log_q, 0, 1).reshape(-1)

  repeat = lambda a: jnp.repeat(a, num_samples, axis=0)
  residual_y = repeat(y) - op.apply(x, jax.tree.map(repeat, omega))
  data = jnp.sum(residual_y**2, axis=(1, 2, 3)) / (2.0 * sigma_y**2)
  prior_out = prior_log_prob(x)
  log_prior, prior_aux = prior_out if prior_has_aux else (prior_out, {})
  prior_nll = -log_prior

  data_fidelity = jnp.mean(data) / dims
  prior_term = jnp.mean(prior_nll) / dims
  log_q_term = jnp.mean(log_q) / dims
  loss = beta_data * data_fidelity + beta_prior * prior_term + beta_ent * log_q_term
  terms = {"data_fidelity": data_fidelity, "prior_nll": prior_term,
           "log_q": log_q_term, "loss": loss, **prior_aux}
  return (loss, terms, x) if return_samples else (loss, terms)


def diffusion_log_prob(eps_fn: diffusion.EpsFn, schedule: diffusion.VPSchedule, rng: jax.Array,
                       *, num_time_samples: int = 1, time_sampling: str = "log_snr",
                       gradient: str = "exact", axis_name: str | None = None):
  """x [N, H, W, C] -> −(diffusion ELBO bound) [N], a lower bound on log p_θ(x).

  The prior of the flow's loss when the prior is a diffusion model: pass
  ``eps_fn`` with the score network's params under stop_gradient so that
  only x receives gradients (docs/design.md §2.2).
  """
  return lambda x: -diffusion.nll_bound(
      eps_fn, schedule, x, rng, num_time_samples=num_time_samples,
      time_sampling=time_sampling, gradient=gradient, axis_name=axis_name)


def _handover_prior(gaussian_log_prob, diffusion_prior, weight):
  """x -> (1 − w) gaussian_log_prob(x) + w diffusion_prior(x), skipping a zero-weight term.

  The skip (lax.cond on the traced w) matters: while the fitted Gaussian is the
  whole prior the diffusion bound would cost a U-Net pass and its gradient
  every step for nothing. w is the same on every device, so every device takes
  the same branch.
  """
  weight = jnp.asarray(weight, jnp.float32)

  def log_prob(x):
    zeros = jnp.zeros(x.shape[:1], jnp.float32)
    diff = jax.lax.cond(weight > 0, lambda: weight * diffusion_prior(x), lambda: zeros)
    gauss = jax.lax.cond(weight < 1, lambda: (1.0 - weight) * gaussian_log_prob(x),
                         lambda: zeros)
    return diff + gauss
  return log_prob


def flowdiff_loss(flow: flow_lib.ConditionalGlow, flow_params: Any,
                  make_eps_fn: Callable[[Any, bool], diffusion.EpsFn], score_params: Any,
                  schedule: diffusion.VPSchedule, rng: jax.Array, y: jax.Array, omega: dict,
                  op: Any, *, num_samples: int = 1, beta_data: float | jax.Array = 1.0,
                  beta_prior: float | jax.Array = 1.0, beta_ent: float | jax.Array = 1.0,
                  residual: bool = True, num_time_samples: int = 1,
                  time_sampling: str = "log_snr", prior_gradient: str = "exact",
                  x_hat: jax.Array | None = None,
                  gaussian_log_prob: Callable[[jax.Array], jax.Array] | None = None,
                  diffusion_weight: float | jax.Array = 1.0, axis_name: str | None = None,
                  score_apply: diffusion.ScoreApply | None = None,
                  dropout_rng: jax.Array | None = None):
  """The joint FlowDiff loss: L_flow(φ; sg θ) + L_DSM(θ; sg x), per dimension.

  Args:
    flow, flow_params: the conditional flow q_φ and its variables.
    make_eps_fn: (score params, train) -> eps_fn (x_t [N, H, W, C], t [N]) -> ε̂;
      train=True is the training mode (dropout, keys bound by the caller) used
      for the DSM loss, train=False the deterministic network of the prior bound.
    score_params: the score network's params θ.
    schedule: the diffusion schedule.
    rng: key of this step's draws (flow base draws, prior bound, DSM).
    y, omega, op: observations [B, H, W, C], operator parameters, operator.
    num_samples: flow samples S per observation; the score network trains on
      all B·S of them.
    beta_*, residual, x_hat: as in `amortized_flow_loss`.
    num_time_samples, time_sampling, prior_gradient: of the prior bound
      (`diffusion.nll_bound`'s num_time_samples, time_sampling, gradient).
    gaussian_log_prob: x [N, H, W, C] -> log N(x; μ̂, Σ̂) [N] of a fitted
      Gaussian, or None. When given, the flow's prior term is the mixture
      (1 − w) log N + w (diffusion bound) with w = diffusion_weight (a scalar
      in [0, 1], possibly traced); a term whose weight is 0 is not computed.
    axis_name: the mapped axis under shard_map/pmap, None under jit.
    score_apply, dropout_rng: when given ((params, x_t, t, dropout key) -> ε̂
      and its key), the prior bound and the DSM loss share one pass of the
      score network (`diffusion.nll_bound_and_dsm`: the same (t, ε) draws, the
      network in training mode for both, the DSM importance-weighted from the
      bound's time proposal) instead of a pass each; make_eps_fn is then
      unused and prior_gradient must be "exact".
  Returns:
    (total, terms): terms has the flow's terms (`amortized_flow_loss`),
    "flow_loss" (its weighted sum), "dsm_loss" (squared ε error per dimension
    of the score network on the flow samples) and "loss" (= total).
  """
  flow_rng, prior_rng, dsm_rng = jax.random.split(rng, 3)
  flow_kwargs = dict(num_samples=num_samples, beta_data=beta_data, beta_prior=beta_prior,
                     beta_ent=beta_ent, residual=residual, x_hat=x_hat, axis_name=axis_name,
                     return_samples=True)
  if score_apply is not None:
    if prior_gradient != "exact":
      raise ValueError("the shared score pass needs prior_gradient='exact', got "
                       f"{prior_gradient!r}")

    def prior_and_dsm(x):
      bound, dsm_per_example = diffusion.nll_bound_and_dsm(
          score_apply, score_params, schedule, x, prior_rng, dropout_rng,
          num_time_samples=num_time_samples, time_sampling=time_sampling, axis_name=axis_name)
      log_p = -bound
      if gaussian_log_prob is not None:
        # No skipping of the diffusion term here: the DSM loss needs its pass anyway.
        weight = jnp.asarray(diffusion_weight, jnp.float32)
        gauss = jax.lax.cond(weight < 1, lambda: (1.0 - weight) * gaussian_log_prob(x),
                             lambda: jnp.zeros(x.shape[:1], jnp.float32))
        log_p = weight * log_p + gauss
      return log_p, {"dsm_loss": jnp.mean(dsm_per_example)}

    flow_loss, terms, _ = amortized_flow_loss(
        flow, flow_params, flow_rng, y, omega, op, prior_and_dsm, prior_has_aux=True,
        **flow_kwargs)
    dsm = terms["dsm_loss"]
    total = flow_loss + dsm
    return total, {**terms, "flow_loss": flow_loss, "loss": total}
  # θ̄ = sg(θ): the prior term trains the flow only.
  frozen = make_eps_fn(jax.lax.stop_gradient(score_params), False)
  prior = diffusion_log_prob(frozen, schedule, prior_rng, num_time_samples=num_time_samples,
                             time_sampling=time_sampling, gradient=prior_gradient,
                             axis_name=axis_name)
  if gaussian_log_prob is not None:
    prior = _handover_prior(gaussian_log_prob, prior, diffusion_weight)
  flow_loss, terms, x = amortized_flow_loss(
      flow, flow_params, flow_rng, y, omega, op, prior, **flow_kwargs)
  # sg(x): the score loss trains the score network only.
  dsm = jnp.mean(diffusion.dsm_loss(make_eps_fn(score_params, True), schedule,
                                    jax.lax.stop_gradient(x), dsm_rng, axis_name=axis_name))
  total = flow_loss + dsm
  return total, {**terms, "flow_loss": flow_loss, "dsm_loss": dsm, "loss": total}
