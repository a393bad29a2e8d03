"""Fashion-MNIST deblurring: 9×9 Gaussian kernel, std 2, σ_y = 0.02 ([-1, 1] scale)."""

from flowdiff_jax.configs import fmnist_noise


def get_config():
  config = fmnist_noise.get_config()
  config.operator.name = "blur"
  config.operator.kernel_size = 9
  config.operator.kernel_std = 2.0
  config.operator.sigma_y = 0.02  # [-1, 1] scale
  # The warm start's fit: dense Σ, unseen frequencies starting at variance 0.1,
  # 64 iterations (experiments/gaussian_em/sweep.json).
  config.gaussian_em.update(rank=0, init_var=0.1, num_iters=64)
  return config
