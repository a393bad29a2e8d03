"""Tiny settings for the tests: a few steps of a very small U-Net on 28×28 images.

Data come from the test (in-memory arrays or tfds mock data); sizes are chosen so
a step compiles and runs in about a second on one CPU core.
"""

from flowdiff_jax.configs import default


def get_config():
  config = default.get_config()
  config.data.dataset = "fashion_mnist"
  config.data.num_eval_examples = 8
  config.operator.name = "denoise"
  config.operator.sigma_y = 0.2

  config.model.base_channels = 8
  config.model.channel_mult = (1, 2)
  config.model.num_res_blocks = 1
  config.model.attn_resolutions = (14,)
  config.model.dropout = 0.0  # dropout is tested in test_unet; here it only costs compile time
  config.model.num_groups = 4

  config.flow.num_levels = 2
  config.flow.num_steps = 1
  config.flow.hidden_channels = 8
  config.flow.cond_channels = 4
  config.amortized.prior = "gaussian"
  config.amortized.gaussian_fit_examples = 32
  config.amortized.eval_num_samples = 2

  config.optim.warmup_steps = 2
  config.flow_optim.warmup_steps = 2
  config.training.batch_size = 8
  config.training.num_train_steps = 4
  config.training.log_every_steps = 2
  config.training.eval_every_steps = 2
  config.training.sample_every_steps = 4
  config.training.checkpoint_every_steps = 2
  config.eval.batch_size = 8
  config.eval.num_samples = 4
  config.eval.sample_steps = 2
  return config
