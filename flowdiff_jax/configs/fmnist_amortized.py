"""The amortized posterior on Fashion-MNIST denoising (σ_y = 0.2, [-1, 1] scale).

The conditional flow alone, trained against a *frozen* diffusion prior: the EMA
score network of a finished clean or naive run with the same data and operator.
Pass that run's workdir:

  python -m flowdiff_jax.main --config=configs/fmnist_amortized.py \\
      --config.amortized.prior_workdir=workdirs/fmnist_clean
"""

from flowdiff_jax.configs import fmnist_noise


def get_config():
  config = fmnist_noise.get_config()
  config.method = "amortized"
  config.amortized.prior = "diffusion"
  config.amortized.beta_prior_warmup_steps = 0  # the prior is trained already
  # The flow is fmnist_noise's (2 levels x 4 steps, width 32); against a frozen
  # prior it keeps the constant β_ent = 1 and lr 5e-4 it was measured with
  # (fmnist_noise's entropy annealing and lr 1e-3 are for the joint training).
  config.amortized.beta_ent_init = 1.0
  config.amortized.beta_ent_anneal_steps = 0
  config.flow_optim.learning_rate = 5e-4
  config.training.batch_size = 32
  config.training.num_train_steps = 1_500
  config.training.log_every_steps = 50
  config.training.eval_every_steps = 500
  config.training.sample_every_steps = 500
  config.training.checkpoint_every_steps = 500
  return config
