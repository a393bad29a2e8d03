#!/bin/bash
# Copies the evaluations of finished runs from their workdirs into the
# repository for results.py: eval/metrics.{json,md} and the sample grids, the
# 64-sample posterior evaluation (eval64/metrics.json, as posterior64.json) where
# it was run, and the runs' lines of WORKDIR_ROOT/wall_times.txt.
#   bash experiments/fmnist/copy_evals.sh WORKDIR_ROOT FOLDER RUN ...
# e.g. bash experiments/fmnist/copy_evals.sh workdirs/fmnist_cosine cosine denoise_naive_cosine
set -e
ROOT=$1; DEST=experiments/fmnist/$2; shift 2
mkdir -p "$DEST"
for run in "$@"; do
  mkdir -p "$DEST/$run"
  for f in metrics.json metrics.md samples.png posterior.png; do
    [ -e "$ROOT/$run/eval/$f" ] && cp "$ROOT/$run/eval/$f" "$DEST/$run/"
  done
  [ -e "$ROOT/$run/eval64/metrics.json" ] && cp "$ROOT/$run/eval64/metrics.json" "$DEST/$run/posterior64.json"
  # "<task> <name>: N s" and "evaluate <run>: N s", once each
  task=${run%%_*}; name=${run#*_}
  grep -E "^($task $name|evaluate $run): " "$ROOT/wall_times.txt" | while read -r line; do
    grep -qxF "$line" "$DEST/wall_times.txt" 2>/dev/null || echo "$line" >> "$DEST/wall_times.txt"
  done
done
