#!/bin/bash
# clean, naive and flowdiff on Fashion-MNIST for three corruptions, equal budgets:
# 2000 steps of batch 32 (64k images seen, about one epoch of the 60k training
# set) each, the quickstart-size U-Net (base 16 channels, ~0.3M parameters) and
# the fmnist_noise conditional Glow (2 levels x 4 steps, width 32).
#   denoise: sigma_y = 0.2 (configs/fmnist_noise.py)
#   inpaint: random pixels dropped with p = 0.6, sigma_y = 0.01 (configs/fmnist_inpaint.py)
#   blur:    9x9 Gaussian, std 2, sigma_y = 0.02 (configs/fmnist_blur.py)
# flowdiff here is the run without the Gaussian-EM warm start that the configs
# now default to (flow.base=pinv: the flow's base is A⁺y; results key
# flowdiff_no_warm_start); run_warm.sh runs it with the warm start.
# `clean` never sees corruptions, so one clean run serves all three tasks.
# Run from the repository root:
#   bash experiments/fmnist/run.sh [PYTHON] [WORKDIR_ROOT]
# Rerunning resumes unfinished runs from their checkpoints.
# Environment: STEPS (default 2000; other values name the runs <task>_<method>_<STEPS>),
# TASKS (default "denoise inpaint blur"), METHODS (default "naive flowdiff"),
# CLEAN (default 1: also the clean run), e.g. the 6000-step references of the
# equal-wall-time comparison with run_warm.sh and run_em.sh:
#   STEPS=6000 TASKS="denoise blur" METHODS=naive bash experiments/fmnist/run.sh
# DECAY=1: both learning rates decay by a cosine to 0 at the last step (as
# run_warm.sh's DECAY=1); "_cosine" is appended to the runs' names.
set -e
PY=${1:-.venv/bin/python}
ROOT=${2:-workdirs/fmnist}
STEPS=${STEPS:-2000}
TASKS=${TASKS:-denoise inpaint blur}
METHODS=${METHODS:-naive flowdiff}
DECAY=${DECAY:-0}
declare -A CONFIG=([denoise]=fmnist_noise [inpaint]=fmnist_inpaint [blur]=fmnist_blur)
COMMON="--config.model.base_channels=16 --config.model.num_groups=4 \
 --config.training.batch_size=32 --config.training.num_train_steps=$STEPS \
 --config.training.eval_every_steps=1000 --config.training.sample_every_steps=1000 \
 --config.training.checkpoint_every_steps=250 --config.optim.learning_rate=1e-3 \
 --config.optim.warmup_steps=100 --config.optim.ema_decay=0.995 --config.eval.num_samples=36 \
 --config.eval.sample_steps=100 --config.amortized.beta_prior_warmup_steps=300 \
 --config.flow.base=pinv \
 --config.amortized.beta_ent_init=1.0 --config.amortized.beta_ent_anneal_steps=0 \
 --config.flow_optim.learning_rate=5e-4"  # the flow settings these runs had (configs' before 2026-12-06)
SUFFIX=""
if [ "$DECAY" = 1 ]; then
  COMMON="$COMMON --config.optim.decay_steps=$STEPS --config.flow_optim.decay_steps=$STEPS"
  SUFFIX=_cosine
fi
run() {  # task config method
  name=$3
  [ "$STEPS" = 2000 ] || name=${name}_$STEPS
  name=$name$SUFFIX
  # A finished run is skipped (rerunning it would only add a wall-time line).
  [ -e "$ROOT/$1_$name/checkpoints/$STEPS" ] && return
  start=$(date +%s)
  $PY -m flowdiff_jax.main --config=configs/$2.py $COMMON --config.method=$3 \
    --workdir=$ROOT/$1_$name
  echo "$1 $name: $(( $(date +%s) - start )) s" | tee -a $ROOT/wall_times.txt
}
mkdir -p $ROOT
[ "${CLEAN:-1}" = 0 ] || run any fmnist_noise clean
for task in $TASKS; do
  for method in $METHODS; do
    run $task ${CONFIG[$task]} $method
  done
done
