"""CelebA 64×64 (centre crop) deblurring: 9×9 Gaussian kernel, std 2 (docs/design.md §3.1).

σ_y = 0.02 on the [-1, 1] scale. U-Net as DDPM's 64×64 models: four levels,
attention at 16×16.
"""

from flowdiff_jax.configs import default


def get_config():
  config = default.get_config()
  config.method = "flowdiff"  # --config.method=clean|naive for the baselines
  config.data.dataset = "celeb_a"
  config.data.image_size = 64
  config.operator.name = "blur"
  config.operator.kernel_size = 9
  config.operator.kernel_std = 2.0
  config.operator.sigma_y = 0.02  # [-1, 1] scale
  config.model.channel_mult = (1, 1, 2, 2, 4)
  config.model.attn_resolutions = (16,)
  config.training.batch_size = 64
  config.training.num_train_steps = 500_000
  return config
