"""Fashion-MNIST random inpainting, 60 % of pixels dropped, σ_y = 0.01 ([-1, 1] scale)."""

from flowdiff_jax.configs import fmnist_noise


def get_config():
  config = fmnist_noise.get_config()
  config.operator.name = "inpaint_random"
  config.operator.drop_prob = 0.6
  config.operator.sigma_y = 0.01  # [-1, 1] scale
  return config
