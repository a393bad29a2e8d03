"""CIFAR-10 32×32 random inpainting: 60 % of pixels dropped (EMDiffusion protocol).

Protocol: docs/design.md §3.1.

A small measurement noise σ_y = 0.01 ([-1, 1] scale) keeps the likelihood of the
observed pixels proper for the posterior methods.
"""

from flowdiff_jax.configs import default


def get_config():
  config = default.get_config()
  config.method = "flowdiff"  # --config.method=clean|naive for the baselines
  config.data.dataset = "cifar10"
  config.operator.name = "inpaint_random"
  config.operator.drop_prob = 0.6
  config.operator.sigma_y = 0.01  # [-1, 1] scale
  return config
