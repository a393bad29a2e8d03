"""Fashion-MNIST random inpainting, 60 % of pixels dropped, σ_y = 0.01 ([-1, 1] scale)."""

from flowdiff_jax.configs import fmnist_noise


def get_config():
  config = fmnist_noise.get_config()
  config.operator.name = "inpaint_random"
  config.operator.drop_prob = 0.6
  config.operator.sigma_y = 0.01  # [-1, 1] scale
  # Per-example masks: Σ of rank 64 plus a diagonal (a dense Σ needs one D×D
  # solve per example); the tuned settings of experiments/gaussian_em/sweep.json.
  config.gaussian_em.update(rank=64, init_var=1.0, num_iters=48)
  return config
