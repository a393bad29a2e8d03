"""The launch recipes of experiments/launch, and multi-host faults with two real processes.

The dry runs of the three recipes are checked for the command lines they print.
The SLURM recipe's lines are then run as they are, two tasks on this machine
(1 CPU device each, joined by jax's SLURM cluster detection on 127.0.0.1), for
the faults a pod slice or a SLURM job meets: SIGTERM to one process of two, a
damaged newest checkpoint that both processes see, and a resume under another
process count. Every two-process run is compared with one uninterrupted
two-process run of the same recipe, bit for bit.
"""

import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from runs_testing import REPO, Run, arrays, assert_same_arrays, run_env, steps, truncate_all

LAUNCH = os.path.join(REPO, "experiments", "launch")
STEPS = 20
# The first port of the range jax's SLURM cluster takes its coordinator port from
# (61440 + SLURM_JOB_ID % 4096).
SLURM_PORTS = 65536 - 4096


def _dry_run(script: str, *args: str, **env) -> list[str]:
  out = subprocess.run(["bash", os.path.join(LAUNCH, script), "--dry-run", *args],
                       capture_output=True, text=True, env={**os.environ, **env}, check=True)
  return out.stdout.splitlines()


def _split(line: str) -> tuple[dict[str, str], list[str]]:
  """A printed command line -> (its leading VAR=value assignments, the command's words)."""
  words = shlex.split(line)
  assignments = {}
  while words and re.fullmatch(r"[A-Z_]+=.*", words[0]):
    name, value = words.pop(0).split("=", 1)
    assignments[name] = value
  return assignments, words


# A flag with characters a shell would take apart, to check the quoting.
ODD_FLAG = "--config.model.channel_mult=(1, 2)"


def test_slurm_dry_run_prints_one_task_line_per_gpu():
  lines = _dry_run("slurm.sh", "--nodes=2", "--tasks-per-node=4", "--job-id=99",
                   "--config=configs/cifar_noise.py", ODD_FLAG)
  assert len(lines) == 8
  for rank, line in enumerate(lines):
    env, words = _split(line)
    assert env["SLURM_PROCID"] == str(rank) and env["SLURM_LOCALID"] == str(rank % 4)
    assert env["SLURM_NTASKS"] == "8" and env["SLURM_JOB_ID"] == "99"
    assert env["SLURM_STEP_NODELIST"] == "node001,node002"
    assert env["SLURMD_NODENAME"] == f"node00{rank // 4 + 1}"
    assert words[:3] == ["bash", os.path.join(LAUNCH, "slurm.sh"), "--task"]
    assert words[3:] == ["--config=configs/cifar_noise.py", ODD_FLAG]
  with pytest.raises(subprocess.CalledProcessError):
    _dry_run("slurm.sh", "--nodes=2", "--nodelist=a")  # two nodes, one name


def test_multi_gpu_dry_run_splits_the_gpus():
  one = _dry_run("multi_gpu.sh", "--config=configs/cifar_noise.py", ODD_FLAG)
  assert len(one) == 1
  env, words = _split(one[0])
  assert env == {} and words[1:] == ["-m", "flowdiff_jax.main", "--config=configs/cifar_noise.py",
                                     ODD_FLAG]
  lines = _dry_run("multi_gpu.sh", "--processes=2", ODD_FLAG, NUM_GPUS="4", PORT="4321")
  envs = [_split(line)[0] for line in lines]
  assert envs == [{"JAX_COORDINATOR_ADDRESS": "127.0.0.1:4321", "JAX_NUM_PROCESSES": "2",
                   "JAX_PROCESS_ID": str(p), "JAX_LOCAL_DEVICE_IDS": ids}
                  for p, ids in enumerate(["0,1", "2,3"])]
  assert all(_split(line)[1][-1] == ODD_FLAG for line in lines)
  refused = subprocess.run(["bash", os.path.join(LAUNCH, "multi_gpu.sh"), "--dry-run",
                            "--processes=2"], capture_output=True, text=True,
                           env={**os.environ, "NUM_GPUS": "3"})
  assert refused.returncode == 2 and "needs a multiple of 2 GPUs; found 3" in refused.stderr


def test_tpu_pod_dry_run_prints_the_gcloud_steps_and_every_workers_command():
  lines = _dry_run("tpu_pod.sh", "--workers=4", "my-tpu", "us-central2-b", "gs://my-bucket",
                   "--config=configs/cifar_noise.py", ODD_FLAG, REPO_URL="https://x/y.git")
  gcloud, workers = lines[:2], lines[2:]
  commands = []
  for line in gcloud:
    words = shlex.split(line)
    assert words[:7] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "my-tpu",
                         "--zone=us-central2-b"] and words[7] == "--worker=all"
    commands.append(words[8].removeprefix("--command="))
  setup, train = commands
  assert "git clone -q https://x/y.git flowdiff_jax" in setup and "make setup" in setup
  assert "jax[tpu]==" in setup
  assert len(workers) == 4
  for w, line in enumerate(workers):
    prefix, command = line.split(": ", 1)
    assert prefix == f"worker {w}" and command == train
    words = shlex.split(command.split(" && ", 1)[1])
    assert words == [".venv/bin/python", "-m", "flowdiff_jax.main",
                     "--config=configs/cifar_noise.py", ODD_FLAG,
                     "--workdir=gs://my-bucket/cifar_noise"]
  refused = subprocess.run(["bash", os.path.join(LAUNCH, "tpu_pod.sh"), "--dry-run", "t", "z",
                            "b", "--workdir=/tmp/x"], capture_output=True, text=True)
  assert refused.returncode == 2 and "sets --workdir" in refused.stderr
  refused = subprocess.run(["bash", os.path.join(LAUNCH, "tpu_pod.sh"), "--dry-run", "t", "z",
                            "b"], capture_output=True, text=True)
  assert refused.returncode == 2 and "needs --config" in refused.stderr


# --- Two real processes through the SLURM recipe ----------------------------------------


def _flags(workdir, idx_dir: str, **overrides) -> list[str]:
  """A tiny clean run: checkpoints every 6 steps, a log line per step."""
  fields = {
      "method": "clean", "training.num_train_steps": STEPS, "training.batch_size": 8,
      "data.max_train_examples": 64, "data.fmnist_idx_dir": idx_dir, "data.read_threads": 1,
      "training.log_every_steps": 1, "training.checkpoint_every_steps": 6,
      "training.eval_every_steps": 0, "training.sample_every_steps": 0,
      "model.channel_mult": "(1,)", "model.attn_resolutions": "()", **overrides}
  return ([f"--config={os.path.join(REPO, 'configs', 'tiny.py')}", f"--workdir={workdir}"]
          + [f"--config.{k}={v}" for k, v in fields.items()])


def _slurm_job_id() -> int:
  """A job id whose coordinator port (61440 + id % 4096) is free on this machine now."""
  for _ in range(100):
    port = SLURM_PORTS + int.from_bytes(os.urandom(2), "little") % 4096
    with socket.socket() as s:
      try:
        s.bind(("127.0.0.1", port))
      except OSError:
        continue
    return port - SLURM_PORTS
  raise RuntimeError("no free port in 61440-65535")


class Job:
  """The two tasks of one `srun` of experiments/launch/slurm.sh, run from its dry-run lines."""

  def __init__(self, workdir, flags: list[str]):
    lines = _dry_run("slurm.sh", "--nodes=1", "--tasks-per-node=2", "--nodelist=127.0.0.1",
                     f"--job-id={_slurm_job_id()}", *flags, PYTHON=sys.executable)
    assert len(lines) == 2
    self.tasks = [Run([], workdir, cmd=line, env=run_env(), name=f"task{i}.")
                  for i, line in enumerate(lines)]

  def wait(self, returncode: int = 0) -> list[str]:
    try:
      return [task.wait(returncode) for task in self.tasks]
    finally:
      for task in self.tasks:
        task.kill()  # a task that lost its partner would wait for jax's heartbeat timeout


@pytest.fixture(scope="module")
def reference(tmp_path_factory, fmnist_idx_dir):
  """The uninterrupted two-process run (checkpoints 12, 18, 20 kept), started on first use."""
  workdir = tmp_path_factory.mktemp("multihost") / "reference"
  job = Job(workdir, _flags(workdir, fmnist_idx_dir))
  state = {"job": job, "done": False}

  def finished() -> str:
    if not state["done"]:
      logs = job.wait()
      state["done"] = True
      assert "jax.distributed initialized (SLURM job" in logs[0], logs[0][-3000:]
      assert "process 1 of 2, 1 local and 2 global cpu devices" in logs[1], logs[1][-3000:]
    return str(workdir)

  yield finished
  for task in job.tasks:
    task.kill()


def _copy(workdir: str, to) -> str:
  shutil.copytree(workdir, to, ignore=shutil.ignore_patterns("events.out.*"))
  return str(to)


@pytest.mark.slow
def test_sigterm_to_one_task_saves_the_same_step_on_both_and_resumes_bit_identical(
    reference, tmp_path, fmnist_idx_dir):
  work = tmp_path / "run"
  flags = _flags(work, fmnist_idx_dir)
  job = Job(work, flags)
  job.tasks[0].wait_for_step(2)  # the metrics are process 0's
  job.tasks[1].proc.send_signal(signal.SIGTERM)
  logs = job.wait(returncode=128 + signal.SIGTERM)
  stopped = [re.search(r"Stopped at the preemption sync point \(SIGTERM to one of the "
                       r"processes\) after step (\d+) of", log) for log in logs]
  assert all(stopped), "\n---\n".join(log[-2000:] for log in logs)
  stop = int(stopped[0].group(1))
  assert int(stopped[1].group(1)) == stop and 2 <= stop < STEPS
  assert steps(work)[-1] == stop
  assert sorted(os.listdir(os.path.join(work, "checkpoints", str(stop), "data"))) == [
      "commit_success.txt", "process_0-of-2.json", "process_1-of-2.json"]

  logs = Job(work, flags).wait()  # the same command again, as a requeued job runs it
  assert all(f"Resumed from step {stop} " in log for log in logs)
  assert_same_arrays(arrays(work), arrays(reference()))


@pytest.mark.slow
def test_a_damaged_newest_checkpoint_sends_both_tasks_to_the_same_older_step(
    reference, tmp_path, fmnist_idx_dir):
  work = _copy(reference(), tmp_path / "run")
  assert steps(work) == [12, 18, 20]
  want = arrays(work)
  state = os.path.join(work, "checkpoints", "20", "state")
  damaged = [os.path.join(state, d, "d") for d in os.listdir(state) if d.startswith("ocdbt.")]
  assert damaged
  for folder in damaged:
    truncate_all(folder)

  logs = Job(work, _flags(work, fmnist_idx_dir)).wait()
  for log in logs:
    assert re.search(r"Checkpoint step 20 in .* does not read back", log), log[-3000:]
    assert "Resumed from step 18 " in log
  assert re.search(r"Resuming from step 18, the newest complete checkpoint in .*; skipped "
                   r"step 20, moved to .*corrupt_checkpoints", logs[0])
  assert sorted(os.listdir(os.path.join(work, "corrupt_checkpoints"))) == ["20"]
  assert_same_arrays(arrays(work), want)


@pytest.mark.slow
def test_a_resume_under_one_process_is_refused_then_allowed(reference, tmp_path,
                                                            fmnist_idx_dir):
  work = _copy(reference(), tmp_path / "run")
  shutil.rmtree(os.path.join(work, "checkpoints", "20"))
  flags = _flags(work, fmnist_idx_dir)
  # One process with the same two devices: only the process count differs.
  log = Run(flags, work, env=run_env(devices=2)).wait(returncode=2)
  assert re.search(r"Checkpoint step 18 in .* was written by 2 JAX process\(es\); this run "
                   r"has 1\..*--allow_process_count_change", log)
  assert steps(work) == [12, 18]

  log = Run(flags + ["--allow_process_count_change"], work, env=run_env(devices=2)).wait()
  assert "the data order continues from global batch 18" in log
  assert "Training clean on fashion_mnist/denoise from step 18 to 20" in log
  # Gradient sums in another order (in-process vs gloo): float rounding apart.
  want, got = arrays(reference()), arrays(work)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(want), jax.tree.leaves(got),
                          strict=True):
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-7, err_msg=jax.tree_util.keystr(path))
