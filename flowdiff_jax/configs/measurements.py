"""FlowDiff on your own measurements in files: no clean images anywhere; sized for a CPU.

Give the data on the command line:

  python -m flowdiff_jax.main --config=configs/measurements.py \
      --config.data.path=my_measurements/ [--config.data.mask_dir=my_masks/] \
      --config.operator.name=inpaint_random --config.operator.sigma_y=0.1

`data.dataset` is "folder" (PNG/JPEG/TIFF images; `--config.data.dataset=npz`
for one .npz file with "y" and, for inpainting, "mask"). The image size and
channel count come from the files. σ_y is on the [-1, 1] scale of the value
rule in flowdiff_jax/measurements.py (0.1 is 5 % of the data range);
`--config.data.estimate_sigma_y=True` estimates it from the data instead.

The networks are small (a ~0.3M-parameter U-Net, a 2-level Glow with 2 steps
per level) so that the README's 32×32 example trains in minutes on 2 CPU
cores; for larger images or data sets, enlarge `model` and `flow` as in the
fmnist_* configs. Evaluation needs no ground truth: the posterior samples'
data consistency `eval/residual_ratio` (≈ 1 when calibrated) and
`eval/posterior_std`; `data.reference_path` adds PSNR against clean images.
"""

from flowdiff_jax.configs import default


def get_config():
  config = default.get_config()
  config.method = "flowdiff"
  config.data.dataset = "folder"
  # data.path (and data.mask_dir for inpainting) are the user's to give.
  config.data.num_eval_examples = 64
  config.operator.name = "inpaint_random"
  config.operator.sigma_y = 0.1  # [-1, 1] scale

  config.model.base_channels = 16
  config.model.channel_mult = (1, 2, 2)
  config.model.num_res_blocks = 1
  config.model.attn_resolutions = ()
  config.model.dropout = 0.0
  config.model.num_groups = 4

  config.flow.num_levels = 2
  config.flow.num_steps = 2
  config.flow.hidden_channels = 32
  config.flow.cond_channels = 16
  config.flow_optim.learning_rate = 1e-3
  config.flow_optim.warmup_steps = 50
  config.amortized.beta_prior_warmup_steps = 300
  config.amortized.eval_num_samples = 16

  config.optim.learning_rate = 1e-3
  config.optim.warmup_steps = 50
  config.optim.ema_decay = 0.99
  config.training.batch_size = 16
  config.training.num_train_steps = 600
  config.training.log_every_steps = 50
  config.training.eval_every_steps = 200
  config.training.sample_every_steps = 600
  config.training.checkpoint_every_steps = 200
  config.eval.batch_size = 32
  config.eval.num_samples = 36
  config.eval.sample_steps = 50
  return config
