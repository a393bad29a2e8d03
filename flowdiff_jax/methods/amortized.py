"""`amortized`: the conditional flow alone against a fixed prior (docs/design.md §2.3).

The flow q_φ(x | y, ω) is trained with the amortized inference loss against a
prior that does not change: the NLL bound of a frozen diffusion prior (the EMA
score network of a finished `clean` or `naive` run), or an analytic Gaussian.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from flowdiff_jax import configcheck, losses
from flowdiff_jax.methods import base

# Fixed priors of the amortized method.
PRIORS = ("diffusion", "gaussian")


def prior_log_prob(obj: base.Objective, prior_params: Any, rng: jax.Array, *,
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
      base.eps_fn(obj, prior_params), obj.schedule, rng, num_time_samples=obj.num_time_samples,
      time_sampling=obj.time_sampling, gradient=obj.prior_gradient, axis_name=axis_name)


class Amortized(base.Method):
  """The flow trained against a frozen prior; params {"flow", "prior"} (the prior not updated)."""
  name = "amortized"
  has_posterior = True
  frozen_prior = True

  def validate(self, config: ml_collections.ConfigDict) -> None:
    configcheck.choice(config, "amortized.prior", PRIORS)
    if config.amortized.prior == "diffusion" and not config.amortized.prior_workdir:
      configcheck.fail("amortized.prior_workdir", config.amortized.prior_workdir,
                       "the diffusion prior needs the workdir of a finished clean or naive run")
    configcheck.positive(config, "amortized.gaussian_fit_examples", integer=True)
    base.validate_flow_base(config)

  def clean_images_needed(self, config) -> tuple[str, str] | None:
    if config.amortized.prior == "gaussian":
      return "amortized.prior", ("is fitted to clean training images, which measurement files "
                                 "do not have; allowed here: diffusion")
    return None

  def objective(self, config, channels, prior_config=None) -> base.Objective:
    return base.flow_objective(base.base_objective(config, channels, prior_config), config,
                               prior=config.amortized.prior)

  def init_params(self, obj, config, rng, batch, prior_params=None,
                  fitted_params=None) -> dict[str, Any]:
    if prior_params is None:
      raise ValueError("method 'amortized' needs prior_params (a frozen prior)")
    return {"flow": base.init_flow(obj, rng, batch, fitted_params), "prior": prior_params,
            **(fitted_params or {})}

  def fitted_params_shapes(self, config, image_shape):
    return base.flow_base_shapes(config, image_shape)

  def fit_params(self, config, observations, mesh=None):
    return base.fit_flow_base(config, observations, mesh)

  def optimizer(self, config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    return base.partitioned({"flow": base.make_optimizer(config.flow_optim),
                             "prior": optax.set_to_zero(), **base.frozen_transforms(config)})

  def loss_fn(self, obj, batch, step, rng, axis_name=None) -> base.LossFn:
    loss_rng, _ = jax.random.split(rng)  # the second key is the DSM methods' dropout key
    weights = obj.loss_weights(step)

    def loss_fn(params):
      flow_rng, prior_rng = jax.random.split(loss_rng)
      x_hat = base.flow_estimate(obj, params, batch["y"], batch["omega"])
      loss, terms = losses.amortized_flow_loss(
          obj.flow, params["flow"], flow_rng, batch["y"], batch["omega"], obj.operator,
          prior_log_prob(obj, params["prior"], prior_rng, axis_name=axis_name),
          num_samples=obj.num_flow_samples, residual=obj.residual, x_hat=x_hat,
          axis_name=axis_name, **weights)
      return loss, {**terms, **weights}
    return loss_fn

  def step_metrics(self, terms) -> base.Metrics:
    return base.flow_step_metrics(terms)

  def eval_metrics(self, state, batch, rng, *, axis_name=None, num_posterior_samples=16,
                   nll_time_samples=1) -> base.Metrics:
    params = base.posterior_params(state.objective, state.params, state.ema_params)
    return base.posterior_metrics(state.objective, params, batch,
                                  jax.random.fold_in(rng, 1), num_samples=num_posterior_samples,
                                  axis_name=axis_name)

  def diffusion_prior_params(self, state) -> Any:
    if state.objective.prior == "diffusion":
      return state.params["prior"]
    return super().diffusion_prior_params(state)


AMORTIZED = Amortized()
