"""Data parallelism over processes: 2 processes x 2 CPU devices train exactly as 1 x 4.

The training program is launched as users launch it (`python -m flowdiff_jax.main`),
the two processes joined through JAX_COORDINATOR_ADDRESS on a free localhost
port and writing one workdir, as the hosts of a pod slice write one shared
directory.
"""

import os
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from flowdiff_jax import main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Methods whose multi-process run must match the single-process one ("flowdiff"
# joins with the FlowDiff method; "clean" differs from "naive" only in a batch key).
METHODS = ["naive"]
STEPS = 3
TIMEOUT_S = 600  # all three processes together, beside another test worker; a hang still fails

# Cluster variables of the test's own environment must not leak into the runs.
_CLUSTER_PREFIXES = ("SLURM_", "OMPI_", "PMI_", "JAX_COORDINATOR", "JAX_NUM_PROCESSES",
                     "JAX_PROCESS_ID", "JAX_LOCAL_DEVICE_IDS", "TPU_")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _launch(method: str, workdir: str, log_path: str, devices: int, idx_dir: str, **env_extra):
  env = {k: v for k, v in os.environ.items() if not k.startswith(_CLUSTER_PREFIXES)}
  # Unoptimised XLA:CPU code compiles ~30% faster; both sides use it.
  env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} "
             "--xla_backend_optimization_level=0",
             JAX_PLATFORMS="cpu", CUDA_VISIBLE_DEVICES="", **env_extra)
  # 20 examples, batch 8: the third batch straddles the first epoch boundary.
  args = [f"--config={os.path.join(REPO, 'configs', 'tiny.py')}", f"--workdir={workdir}",
          f"--config.method={method}", f"--config.training.num_train_steps={STEPS}",
          "--config.training.batch_size=8", "--config.data.max_train_examples=20",
          f"--config.data.fmnist_idx_dir={idx_dir}", "--config.data.read_threads=1",
          f"--config.training.checkpoint_every_steps={STEPS}",
          f"--config.training.log_every_steps={STEPS}",
          "--config.training.eval_every_steps=0", "--config.training.sample_every_steps=0",
          # A smaller U-Net than tiny's: compile time is what this test pays for.
          "--config.model.channel_mult=(1,)", "--config.model.attn_resolutions=()"]
  log = open(log_path, "wb")
  return subprocess.Popen([sys.executable, "-m", "flowdiff_jax.main", *args], cwd=REPO,
                          env=env, stdout=log, stderr=subprocess.STDOUT), log


def _wait(runs: dict, timeout_s: float) -> None:
  """Waits for all runs; on the first failure or the deadline kills the rest and fails."""
  deadline = time.monotonic() + timeout_s
  pending = dict(runs)
  failed = None
  while pending and failed is None and time.monotonic() < deadline:
    for name, (proc, log) in list(pending.items()):
      if proc.poll() is not None:
        log.close()
        del pending[name]
        if proc.returncode != 0:
          failed = f"{name} exited with {proc.returncode}"
    time.sleep(0.2)
  for proc, log in pending.values():
    proc.kill()  # a peer that lost its partner would wait for its heartbeat timeout
    proc.wait()
    log.close()
  if failed or pending:
    tails = "\n".join(f"--- {name} ---\n{_read(log.name)[-3000:]}"
                      for name, (_, log) in runs.items())
    pytest.fail(f"{failed or f'timed out after {timeout_s}s'}\n{tails}")


def _read(path: str) -> str:
  with open(path, errors="replace") as f:
    return f.read()


def _restore(workdir: str) -> dict:
  """The newest checkpoint's arrays (step, params, ema_params, opt_state) as numpy."""
  directory = os.path.join(workdir, "checkpoints")
  steps = sorted(int(d) for d in os.listdir(directory) if d.isdigit())
  path = os.path.join(directory, str(steps[-1]), "state")
  checkpointer = ocp.PyTreeCheckpointer()
  tree = checkpointer.metadata(path).item_metadata.tree
  as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
  return checkpointer.restore(path, args=ocp.args.PyTreeRestore(restore_args=as_numpy))


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_two_processes_train_like_one(method, tmp_path, fmnist_idx_dir):
  one, two = str(tmp_path / "one"), str(tmp_path / "two")
  address = f"127.0.0.1:{_free_port()}"
  # All three at once: on a small CI machine the runs overlap their start-up.
  runs = {"1 process": _launch(method, one, one + ".log", devices=4, idx_dir=fmnist_idx_dir)}
  for p in range(2):
    runs[f"process {p} of 2"] = _launch(method, two, f"{two}.{p}.log", devices=2,
                                        idx_dir=fmnist_idx_dir,
                                        JAX_COORDINATOR_ADDRESS=address,
                                        JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(p))
  _wait(runs, TIMEOUT_S)

  assert "jax.distributed not initialized: process 0 of 1, 4 local and 4 global" in _read(
      one + ".log")
  for p in range(2):
    assert (f"jax.distributed initialized (JAX_COORDINATOR_ADDRESS={address}): process {p} "
            "of 2, 2 local and 4 global cpu devices") in _read(f"{two}.{p}.log")
  # One checkpoint, complete, with each process's data-iterator position.
  assert sorted(os.listdir(os.path.join(two, "checkpoints"))) == [str(STEPS)]
  assert sorted(os.listdir(os.path.join(two, "checkpoints", str(STEPS), "data"))) == [
      "commit_success.txt", "process_0-of-2.json", "process_1-of-2.json"]

  want, got = _restore(one), _restore(two)
  assert int(got["step"]) == STEPS
  assert jax.tree.structure(want) == jax.tree.structure(got)
  # Equal up to the order of the cross-device gradient sums (gloo vs in-process):
  # measured |diff| <= 2e-8. The same examples in another order within the batch
  # (other per-example draws) already move Adam's moments by ~1e-6.
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(want), jax.tree.leaves(got),
                          strict=True):
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-7, err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("mode, env, tpu, initializes", [
    ("auto", {}, False, False),                                        # a plain machine
    ("auto", {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"}, False, True),
    ("auto", {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "n[1-2]", "SLURM_NTASKS": "8",
              "SLURM_PROCID": "3", "SLURM_LOCALID": "3"}, False, True),
    ("auto", {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "n1", "SLURM_NTASKS": "1",
              "SLURM_PROCID": "0", "SLURM_LOCALID": "0"}, False, False),  # one task: all GPUs
    ("auto", {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "8"}, False, False),  # sbatch script, no srun
    ("auto", {"OMPI_MCA_orte_hnp_uri": "1.0;tcp://10.0.0.1:5", "OMPI_COMM_WORLD_SIZE": "4"},
     False, True),
    ("auto", {"OMPI_MCA_orte_hnp_uri": "1.0;tcp://10.0.0.1:5", "OMPI_COMM_WORLD_SIZE": "1"},
     False, False),
    ("auto", {}, True, True),                                          # Cloud TPU VM (GCE)
    ("auto", {"TPU_SKIP_MDS_QUERY": "1"}, True, False),                # no metadata to ask
    ("auto", {"TPU_SKIP_MDS_QUERY": "1", "TPU_WORKER_HOSTNAMES": "a,b"}, True, True),  # GKE
    ("on", {}, False, True),
    ("off", {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"}, True, False),
])
def test_distributed_detection(mode, env, tpu, initializes):
  assert (main.distributed_reason(mode, env, on_cloud_tpu_vm=tpu) is not None) == initializes
