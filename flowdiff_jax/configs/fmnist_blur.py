"""Fashion-MNIST deblurring: 9×9 Gaussian kernel, std 2, σ_y = 0.02 ([-1, 1] scale)."""

from flowdiff_jax.configs import fmnist_noise


def get_config():
  config = fmnist_noise.get_config()
  config.operator.name = "blur"
  config.operator.kernel_size = 9
  config.operator.kernel_std = 2.0
  config.operator.sigma_y = 0.02  # [-1, 1] scale
  return config
