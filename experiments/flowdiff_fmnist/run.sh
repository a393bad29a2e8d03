#!/bin/bash
# FlowDiff vs the clean and naive baselines on Fashion-MNIST denoising
# (sigma_y = 0.2 on the [-1, 1] scale), equal length: 1500 steps of batch 32
# with the quickstart-size U-Net. Run from the repository root:
#   bash experiments/flowdiff_fmnist/run.sh [PYTHON]
set -e
PY=${1:-.venv/bin/python}
COMMON="--config=configs/fmnist_noise.py --config.model.base_channels=16 --config.model.num_groups=4 \
 --config.training.batch_size=32 --config.training.num_train_steps=1500 \
 --config.training.eval_every_steps=500 --config.training.sample_every_steps=1500 \
 --config.training.checkpoint_every_steps=500 --config.optim.learning_rate=1e-3 \
 --config.optim.warmup_steps=100 --config.optim.ema_decay=0.99 --config.eval.num_samples=36 \
 --config.eval.sample_steps=100 --config.amortized.beta_prior_warmup_steps=300 \
 --config.flow.base=pinv \
 --config.amortized.beta_ent_init=1.0 --config.amortized.beta_ent_anneal_steps=0 \
 --config.flow_optim.learning_rate=5e-4"  # the flow settings these runs had (configs' before 2026-12-06)
for method in flowdiff naive clean; do
  start=$(date +%s)
  $PY -m flowdiff_jax.main $COMMON --config.method=$method --workdir=workdirs/flowdiff_fmnist/$method
  echo "$method: $(( $(date +%s) - start )) s"
done
