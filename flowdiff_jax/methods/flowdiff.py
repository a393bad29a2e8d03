"""`flowdiff`: the flow and the score network trained jointly (docs/design.md §2.4).

One gradient of L_flow(φ; sg θ) + L_DSM(θ; sg x) on the same batch: the flow
is an amortized E-step against the current diffusion prior, the score
network's DSM on the flow's samples the M-step.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import ml_collections
import optax

from flowdiff_jax import configcheck, gaussian_em, losses
from flowdiff_jax.methods import base


class FlowDiff(base.Method):
  """Params {"flow", "score"}; the score network may update every k flow updates."""
  name = "flowdiff"
  has_posterior = True
  has_prior = True

  def validate(self, config: ml_collections.ConfigDict) -> None:
    configcheck.positive(config, "flowdiff.flow_updates_per_score_update", integer=True)
    base.validate_flow_base(config)
    for field in ("gaussian_prior_steps", "handover_steps"):
      value = config.flowdiff.get(field, 0)
      if not isinstance(value, int) or value < 0:
        configcheck.fail(f"flowdiff.{field}", value, "must be an integer >= 0")
    shared = config.flowdiff.get("shared_score_pass", False)  # a bool: ConfigDict checks
    if shared and config.amortized.prior_gradient != "exact":
      configcheck.fail("flowdiff.shared_score_pass", shared,
                       "shares the U-Net's backward pass between the flow's prior bound and "
                       "the DSM loss, which needs amortized.prior_gradient='exact' (with "
                       f"{config.amortized.prior_gradient!r} the bound has no backward pass)")
    if base.gaussian_handover(config) and config.flow.get("base", "pinv") != "gaussian_em":
      configcheck.fail("flowdiff.gaussian_prior_steps", config.flowdiff.gaussian_prior_steps,
                       "the prior hand-over starts from the Gaussian fitted for "
                       "flow.base='gaussian_em'; set that too, or both steps to 0")

  def objective(self, config, channels, prior_config=None) -> base.Objective:
    obj = base.flow_objective(base.base_objective(config, channels), config, prior="diffusion")
    fd = config.flowdiff
    return dataclasses.replace(obj, gaussian_prior_steps=int(fd.get("gaussian_prior_steps", 0)),
                               handover_steps=int(fd.get("handover_steps", 0)),
                               shared_score_pass=bool(fd.get("shared_score_pass", False)))

  def init_params(self, obj, config, rng, batch, prior_params=None,
                  fitted_params=None) -> dict[str, Any]:
    flow_rng, score_rng = jax.random.split(rng)
    return {"flow": base.init_flow(obj, flow_rng, batch, fitted_params),
            "score": base.init_score(obj, score_rng, base.images_shape(batch)),
            **(fitted_params or {})}

  def fitted_params_shapes(self, config, image_shape):
    return base.flow_base_shapes(config, image_shape)

  def fit_params(self, config, observations, mesh=None):
    return base.fit_flow_base(config, observations, mesh)

  def optimizer(self, config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    score_every = int(config.flowdiff.flow_updates_per_score_update)
    return base.partitioned({
        "flow": base.make_optimizer(config.flow_optim),
        "score": base.make_optimizer(config.optim, every_k_steps=score_every),
        **base.frozen_transforms(config)})

  def loss_fn(self, obj, batch, step, rng, axis_name=None) -> base.LossFn:
    loss_rng, dropout_rng = jax.random.split(rng)
    weights = obj.loss_weights(step)
    diffusion_weight = obj.prior_handover(step)

    def make_eps_fn(score_params, train):
      return base.eps_fn(obj, score_params, train=train, dropout_rng=dropout_rng)

    def loss_fn(params):
      x_hat = base.flow_estimate(obj, params, batch["y"], batch["omega"])
      options, extra = {}, {}
      if obj.gaussian_prior:
        fitted = jax.lax.stop_gradient(params[base.GAUSSIAN_PRIOR_KEY])
        options = {"gaussian_log_prob": lambda x: gaussian_em.log_density(fitted, x),
                   "diffusion_weight": diffusion_weight}
        extra = {"diffusion_weight": diffusion_weight}
      if obj.shared_score_pass:
        options.update(score_apply=base.score_apply(obj), dropout_rng=dropout_rng)
      loss, terms = losses.flowdiff_loss(
          obj.flow, params["flow"], make_eps_fn, params["score"], obj.schedule, loss_rng,
          batch["y"], batch["omega"], obj.operator, num_samples=obj.num_flow_samples,
          residual=obj.residual, num_time_samples=obj.num_time_samples,
          time_sampling=obj.time_sampling, prior_gradient=obj.prior_gradient, x_hat=x_hat,
          axis_name=axis_name, **weights, **options)
      return loss, {**terms, **weights, **extra}
    return loss_fn

  def grad_metrics(self, grads) -> base.Metrics:
    return {"train/grad_norm_flow": optax.global_norm(grads["flow"]),
            "train/grad_norm_score": optax.global_norm(grads["score"])}

  def step_metrics(self, terms) -> base.Metrics:
    return base.flow_step_metrics(terms)

  def eval_metrics(self, state, batch, rng, *, axis_name=None, num_posterior_samples=16,
                   nll_time_samples=1) -> base.Metrics:
    obj = state.objective
    metrics = {}
    if "x" in batch:
      metrics.update(base.prior_fit_metrics(
          obj, state.ema_params["score"], batch["x"], jax.random.fold_in(rng, 0),
          nll_time_samples=nll_time_samples, axis_name=axis_name, y=batch.get("y")))
    params = base.posterior_params(obj, state.params, state.ema_params)
    metrics.update(base.posterior_metrics(
        obj, params, batch, jax.random.fold_in(rng, 1),
        num_samples=num_posterior_samples, axis_name=axis_name))
    return metrics

  def diffusion_prior_params(self, state) -> Any:
    return state.ema_params["score"]


FLOWDIFF = FlowDiff()
