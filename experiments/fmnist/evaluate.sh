#!/bin/bash
# Evaluates the runs of experiments/fmnist/run.sh with one protocol and writes
# the table (experiments/fmnist/table.py):
#   500 prior samples per run, DDPM ancestral sampler with 250 steps, EMA
#   params, against the first 1000 Fashion-MNIST test images; FD-FMNIST and
#   KID-FMNIST (subsets of 100) on our classifier's features, pixel moments;
#   for flowdiff also the posterior mean (16 flow samples) on held-out images.
# The deterministic samplers do much worse on these short runs (README), so
# the ancestral one is used for every method.
# Run from the repository root:
#   bash experiments/fmnist/evaluate.sh [PYTHON] [WORKDIR_ROOT] [RUN ...]
# RUN defaults to every finished run under WORKDIR_ROOT (any_clean, <task>_naive,
# <task>_flowdiff); each writes WORKDIR_ROOT/RUN/eval/metrics.{json,md} and figures.
set -e
PY=${1:-.venv/bin/python}
ROOT=${2:-workdirs/fmnist}
shift 2 || true
RUNS=${*:-$(cd "$ROOT" && ls -d any_clean *_naive *_flowdiff 2>/dev/null)}
for run in $RUNS; do
  start=$(date +%s)
  "$PY" -m flowdiff_jax.evaluate --workdir="$ROOT/$run" --num_samples=500 \
    --sampler=ancestral --sample_steps=250 --num_reference=1000 --kid_subset_size=100
  echo "evaluate $run: $(( $(date +%s) - start )) s" | tee -a "$ROOT/wall_times.txt"
done
"$PY" experiments/fmnist/table.py "$ROOT" | tee experiments/fmnist/table.md
