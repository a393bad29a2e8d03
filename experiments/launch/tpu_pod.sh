#!/bin/bash
# A Cloud TPU VM, one host or a pod slice: every worker runs the same command.
#
#   bash experiments/launch/tpu_pod.sh [--dry-run] [--workers=W] TPU_NAME ZONE BUCKET FLAGS...
#
# FLAGS are flowdiff_jax.main's, without --workdir: the run writes to
# gs://BUCKET/$RUN (RUN defaults to the config file's name) directly, the one
# folder every worker sees, as a multi-host run needs (checkpoints through
# orbax/tensorstore, everything else through etils.epath and TensorFlow's GCS
# client, with the TPU VM's service account). Two gcloud steps, each on all
# workers at once:
#   1. setup: clone (or update) the repository, `make setup`, and the TPU build of
#      jax at the version `make setup` resolved;
#   2. train: jax finds the other workers through the TPU VM metadata server
#      (--distributed=auto), so the command is the same on every worker and for
#      every slice size. Rerun the script after a preemption: it resumes.
# --dry-run prints the two gcloud commands and, for each of the W workers
# (default 1; `gcloud compute tpus tpu-vm describe` tells), the exact command
# that worker runs; it starts nothing.
# Environment: REPO_URL (default this checkout's origin), REPO_DIR (default
# flowdiff_jax, under each worker's home), RUN, PROJECT (gcloud --project).
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
dry_run=0; workers=1
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) dry_run=1 ;;
    --workers=*) workers=${1#*=} ;;
    *) break ;;
  esac
  shift
done
if [ $# -lt 3 ]; then
  echo "usage: $0 [--dry-run] [--workers=W] TPU_NAME ZONE BUCKET FLAGS..." >&2
  exit 2
fi
tpu=$1 zone=$2 bucket=${3#gs://}
shift 3
for flag in "$@"; do
  case "$flag" in --workdir=*) echo "tpu_pod.sh sets --workdir (gs://$bucket/\$RUN)." >&2; exit 2 ;; esac
done
config=""
for flag in "$@"; do case "$flag" in --config=*) config=${flag#--config=} ;; esac; done
if [ -z "$config" ]; then
  echo "tpu_pod.sh needs --config=... (it also names the run's folder in the bucket)." >&2
  exit 2
fi
run=${RUN:-$(basename "${config%%:*}" .py)}
repo_url=${REPO_URL:-$(git -C "$HERE" remote get-url origin 2>/dev/null || echo "<REPO_URL>")}
dir=${REPO_DIR:-flowdiff_jax}

setup="if [ -d $dir ]; then git -C $dir pull -q; else git clone -q $repo_url $dir; fi \
&& cd $dir && make setup && .venv/bin/pip install -q \"jax[tpu]==\$(.venv/bin/python -c \
\"import jax; print(jax.__version__)\")\""
train="cd $dir && .venv/bin/python -m flowdiff_jax.main$(printf ' %q' "$@") \
--workdir=gs://$bucket/$run"

ssh=(gcloud compute tpus tpu-vm ssh "$tpu" --zone="$zone" --worker=all)
[ -z "${PROJECT:-}" ] || ssh+=(--project="$PROJECT")
if [ "$dry_run" -eq 1 ]; then
  for step in "$setup" "$train"; do
    # Printed so that they paste into a shell as they are.
    printf '%q ' "${ssh[@]}"
    case "$step" in
      *\'*) printf -- '--command=%q\n' "$step" ;;
      *) printf -- "--command='%s'\n" "$step" ;;
    esac
  done
  for ((w = 0; w < workers; w++)); do echo "worker $w: $train"; done
  exit 0
fi
for step in "$setup" "$train"; do
  "${ssh[@]}" --command="$step"
done
