#!/bin/bash
# Downstream inverse problems (docs/design.md §2.7): DPS and ΠGDM with each trained
# Fashion-MNIST prior on random inpainting (p = 0.6, σ_y = 0.01), denoising
# (σ_y = 0.2) and deblurring (9×9 Gaussian, std 2, σ_y = 0.02), σ_y on the
# [-1, 1] scale. Every prior sees the same test images (0 … NUM_IMAGES − 1 of
# the Fashion-MNIST test split), the same corruptions (seed 0) and the same
# solver seed (0). A flowdiff run also gets a row for its amortized flow on
# the task it was trained on.
#
# Run from the repository root once the priors are trained:
#   bash experiments/inverse/run.sh [PYTHON]
# Environment:
#   PRIORS      "label=workdir ..." (default: the clean run and the denoising
#               naive and flowdiff runs of experiments/fmnist/run.sh; the
#               latter two learned their prior from noisy images only)
#   NUM_IMAGES  test images per task (default 32; a multiple of BATCH)
#   BATCH       images solved together (default 32)
#   SOLVERS     comma-separated solvers (default dps,pigdm)
#   OUT         results folder (default experiments/inverse/results)
# Writes OUT/<label>/<task>/{metrics.json,metrics.md,grid.png}, OUT/table.md
# (all priors and tasks) and OUT/wall_times.txt.
set -e
PY=${1:-.venv/bin/python}
PRIORS=${PRIORS:-"clean=workdirs/fmnist/any_clean naive=workdirs/fmnist/denoise_naive flowdiff=workdirs/fmnist/denoise_flowdiff"}
NUM_IMAGES=${NUM_IMAGES:-32}
BATCH=${BATCH:-32}
SOLVERS=${SOLVERS:-dps,pigdm}
OUT=${OUT:-experiments/inverse/results}
mkdir -p "$OUT"
for prior in $PRIORS; do
  label=${prior%%=*}
  workdir=${prior#*=}
  for task in inpaint denoise deblur; do
    start=$(date +%s)
    "$PY" -m flowdiff_jax.inverse --workdir="$workdir" --task=$task --label="$label" \
        --num_images="$NUM_IMAGES" --batch_size="$BATCH" --solvers="$SOLVERS" --output_dir="$OUT/$label/$task"
    echo "$label $task: $(( $(date +%s) - start )) s" | tee -a "$OUT/wall_times.txt"
  done
done
"$PY" -m flowdiff_jax.inverse --collect="$OUT" --output_dir="$OUT"
