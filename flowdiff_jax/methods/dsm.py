"""The denoising-score-matching baselines: `clean` (the oracle) and `naive` (the lower bound).

Both train only the score network, by DSM on a fixed set of images: the clean
images x for `clean`, the pseudo-inverses A⁺y of the observations for
`naive` (docs/design.md §2.6).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from flowdiff_jax import diffusion
from flowdiff_jax.methods import base


class DenoisingScoreMatching(base.Method):
  """DSM of the score network on `training_images(objective, batch)`."""
  has_prior = True

  def training_images(self, obj: base.Objective, batch: base.Batch) -> jax.Array:
    """The images the score network is trained on, [B, H, W, C]."""
    raise NotImplementedError

  def init_params(self, obj, config, rng, batch, prior_params=None,
                  fitted_params=None) -> dict[str, Any]:
    return {"score": base.init_score(obj, rng, base.images_shape(batch))}

  def optimizer(self, config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    return base.partitioned({"score": base.make_optimizer(config.optim)})

  def loss_fn(self, obj, batch, step, rng, axis_name=None) -> base.LossFn:
    del step
    loss_rng, dropout_rng = jax.random.split(rng)
    x = self.training_images(obj, batch)

    def loss_fn(params):
      eps = base.eps_fn(obj, params["score"], train=True, dropout_rng=dropout_rng)
      loss = jnp.mean(diffusion.dsm_loss(eps, obj.schedule, x, loss_rng, axis_name=axis_name))
      return loss, {"dsm_loss": loss}
    return loss_fn

  def eval_metrics(self, state, batch, rng, *, axis_name=None, num_posterior_samples=16,
                   nll_time_samples=1) -> base.Metrics:
    if "x" not in batch:
      return {}
    return base.prior_fit_metrics(state.objective, state.ema_params["score"], batch["x"],
                                  jax.random.fold_in(rng, 0), nll_time_samples=nll_time_samples,
                                  axis_name=axis_name, y=batch.get("y"))

  def diffusion_prior_params(self, state) -> Any:
    return state.ema_params["score"]


class Clean(DenoisingScoreMatching):
  """DSM on the clean images: the upper bound a method without them aims for."""
  name = "clean"
  inputs = ("x",)

  def clean_images_needed(self, config) -> tuple[str, str] | None:
    return "method", ("needs clean training images, and measurement files have none "
                      "(data.reference_path is for evaluation only)")

  def training_images(self, obj, batch) -> jax.Array:
    return batch["x"]


class Naive(DenoisingScoreMatching):
  """DSM on A⁺y: the corrupted images taken for clean ones."""
  name = "naive"

  def training_images(self, obj, batch) -> jax.Array:
    return obj.operator.pinv(batch["y"], batch["omega"])


CLEAN = Clean()
NAIVE = Naive()
