#!/bin/bash
# One host with several GPUs.
#
#   bash experiments/launch/multi_gpu.sh [--dry-run] [--processes=P] FLAGS...
#
# FLAGS are flowdiff_jax.main's (--config=..., --workdir=...).
# P = 1 (the default): one process drives every GPU of the host; nothing to
#   join, the usual command. This is what to use unless there is a reason not to.
# P > 1: P processes on this host, the GPUs split evenly between them in order
#   (JAX_LOCAL_DEVICE_IDS), joined through a coordinator on 127.0.0.1
#   (JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID, which
#   --distributed=auto picks up): the layout of a multi-host run, on one host.
#   SIGTERM / SIGINT to this script go to every process (each then saves the
#   same step and exits 143 / 130); it exits with the first non-zero status.
#
# --dry-run prints the exact command line of every process and starts nothing.
# Environment: PYTHON (default .venv/bin/python where it exists, else python3),
# NUM_GPUS (default: what nvidia-smi lists), PORT (default 12355).
# On a fresh host the GPU build of jax is one more install, at the version
# `make setup` resolved:
#   .venv/bin/pip install "jax[cuda12]==$(.venv/bin/python -c 'import jax; print(jax.__version__)')"
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
if [ -z "${PYTHON:-}" ]; then
  if [ -x "$REPO/.venv/bin/python" ]; then PYTHON=$REPO/.venv/bin/python; else PYTHON=python3; fi
fi
dry_run=0; processes=1
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) dry_run=1 ;;
    --processes=*) processes=${1#*=} ;;
    *) break ;;
  esac
  shift
done
flags=$(printf ' %q' "$@")
program="$(printf %q "$PYTHON") -m flowdiff_jax.main$flags"

if [ "$processes" -eq 1 ]; then
  if [ "$dry_run" -eq 1 ]; then echo "$program"; exit 0; fi
  cd "$REPO" && exec "$PYTHON" -m flowdiff_jax.main "$@"
fi

gpus=${NUM_GPUS:-$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)}
if [ "${gpus:-0}" -lt "$processes" ] || [ $((gpus % processes)) -ne 0 ]; then
  echo "--processes=$processes needs a multiple of $processes GPUs; found ${gpus:-0}" \
       "(set NUM_GPUS to override)." >&2
  exit 2
fi
per=$((gpus / processes))
lines=()
for ((p = 0; p < processes; p++)); do
  ids=$(seq -s, $((p * per)) $((p * per + per - 1)))
  lines+=("JAX_COORDINATOR_ADDRESS=127.0.0.1:${PORT:-12355} JAX_NUM_PROCESSES=$processes \
JAX_PROCESS_ID=$p JAX_LOCAL_DEVICE_IDS=$ids $program")
done
if [ "$dry_run" -eq 1 ]; then printf '%s\n' "${lines[@]}"; exit 0; fi

cd "$REPO"
pids=()
for line in "${lines[@]}"; do
  # exec: the signal below reaches the program itself, not an intermediate shell.
  bash -c "exec env $line" &
  pids+=($!)
done
trap 'kill -TERM "${pids[@]}" 2>/dev/null || true' TERM
trap 'kill -INT "${pids[@]}" 2>/dev/null || true' INT
status=0
for pid in "${pids[@]}"; do
  # `wait` returns early when a trapped signal arrives: wait again for the exit.
  while :; do
    wait "$pid" && code=0 || code=$?
    kill -0 "$pid" 2>/dev/null || break
  done
  [ "$status" -ne 0 ] || status=$code
done
exit "$status"
