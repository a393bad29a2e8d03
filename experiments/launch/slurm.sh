#!/bin/bash
# SLURM: one task per GPU, every task running the same training command.
#
#   sbatch [--nodes=N --gpus-per-node=G --ntasks-per-node=G] experiments/launch/slurm.sh FLAGS...
#   bash experiments/launch/slurm.sh --dry-run [--nodes=N] [--tasks-per-node=G] \
#       [--nodelist=NAMES] [--job-id=ID] FLAGS...
#
# FLAGS are flowdiff_jax.main's (--config=..., --workdir=<a directory every node sees>).
# Submitted with sbatch, the batch script starts one srun step of N*G tasks, each
# running this script again with --task: it restricts the task to the GPU of its
# local rank (JAX_LOCAL_DEVICE_IDS=$SLURM_LOCALID) and execs the training program,
# whose --distributed=auto joins the tasks through jax's SLURM cluster detection
# (coordinator: the first node of SLURM_STEP_NODELIST, port 61440 + job id % 4096).
# --requeue: a preempted job goes back to the queue and its rerun resumes from the
# checkpoint that the preemption's SIGTERM made every task save.
#
# --dry-run prints, one per task, the exact command line srun would run there with
# the SLURM variables it would set, and starts nothing. The lines run as they are
# on one machine too (tests/test_launch.py starts two of them as real processes).
#
# Environment: PYTHON (default .venv/bin/python where it exists, else python3).
#SBATCH --job-name=flowdiff_jax
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=flowdiff_jax-%j.log
set -euo pipefail
# sbatch runs a copy of this file from its spool directory: submit from the
# repository root (or set FLOWDIFF_REPO).
REPO=${FLOWDIFF_REPO:-${SLURM_SUBMIT_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)}}
SELF=$REPO/experiments/launch/slurm.sh
if [ -z "${PYTHON:-}" ]; then
  if [ -x "$REPO/.venv/bin/python" ]; then PYTHON=$REPO/.venv/bin/python; else PYTHON=python3; fi
fi

case "${1:-}" in
  --task)  # inside one srun task
    shift
    export JAX_LOCAL_DEVICE_IDS=${SLURM_LOCALID:?--task runs inside an srun step}
    cd "$REPO"
    # exec: SLURM's SIGTERM (preemption, scancel, time limit) reaches the program.
    exec "$PYTHON" -m flowdiff_jax.main "$@"
    ;;
  --dry-run)
    shift
    nodes=2; per_node=8; nodelist=""; job_id=${SLURM_JOB_ID:-1234}
    while [ $# -gt 0 ]; do
      case "$1" in
        --nodes=*) nodes=${1#*=} ;;
        --tasks-per-node=*) per_node=${1#*=} ;;
        --nodelist=*) nodelist=${1#*=} ;;
        --job-id=*) job_id=${1#*=} ;;
        *) break ;;
      esac
      shift
    done
    if [ -z "$nodelist" ]; then
      nodelist=$(seq -f "node%03g" 1 "$nodes" | paste -sd, -)
    fi
    IFS=, read -r -a names <<< "$nodelist"
    if [ "${#names[@]}" -ne "$nodes" ]; then
      echo "--nodelist has ${#names[@]} name(s) for --nodes=$nodes" >&2
      exit 2
    fi
    flags=$(printf ' %q' "$@")
    for ((n = 0; n < nodes; n++)); do
      for ((l = 0; l < per_node; l++)); do
        echo "SLURM_JOB_ID=$job_id SLURM_STEP_NODELIST=$nodelist" \
             "SLURM_NTASKS=$((nodes * per_node)) SLURM_PROCID=$((n * per_node + l))" \
             "SLURM_LOCALID=$l SLURMD_NODENAME=${names[$n]} PYTHON=$(printf %q "$PYTHON")" \
             "bash $(printf %q "$SELF") --task$flags"
      done
    done
    ;;
  *)  # the batch script
    [ -n "${SLURM_JOB_ID:-}" ] || { echo "Submit with sbatch, or see --dry-run." >&2; exit 2; }
    # One task per allocated task slot. No --kill-on-bad-exit: after a preemption
    # every task exits 143 once the shared checkpoint is written, and killing the
    # slower ones at the first exit could cut their last writes short. A task
    # that crashes makes the others fail at jax's heartbeat timeout instead.
    srun bash "$SELF" --task "$@"
    ;;
esac
