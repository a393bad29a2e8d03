"""Training programs started as users start them, for the tests that need real processes.

`Run` is one `python -m flowdiff_jax.main` process (or any command) with its
output in a log file next to its workdir; the array helpers read the
checkpoints it leaves. Shared by test_reliability.py and test_multihost.py
(no test file imports another).
"""

import os
import re
import signal
import subprocess
import sys
import time

from etils import epath
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 400  # one run, compile included, on a busy CI machine
# Cluster variables of the test's own environment must not leak into the runs.
CLUSTER_PREFIXES = ("SLURM_", "OMPI_", "PMI_", "TPU_", "JAX_COORDINATOR", "JAX_NUM_PROCESSES",
                    "JAX_PROCESS_ID", "JAX_LOCAL_DEVICE_IDS")


def run_env(devices: int = 1, **extra) -> dict[str, str]:
  """The environment of a run: this one without cluster variables, CPU only, `devices` CPUs."""
  env = {k: v for k, v in os.environ.items() if not k.startswith(CLUSTER_PREFIXES)}
  # Unoptimised XLA:CPU code compiles ~30% faster; every run of a comparison uses it.
  env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} "
             "--xla_backend_optimization_level=0", JAX_PLATFORMS="cpu",
             CUDA_VISIBLE_DEVICES="", TF_CPP_MIN_LOG_LEVEL="2",
             JAX_COMPILATION_CACHE_DIR=os.path.join(REPO, ".pytest_cache", "jax"),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", **extra)
  return env


class Run:
  """One training process, its output in a log file next to its workdir.

  `args`: flowdiff_jax.main's flags, or `cmd`: the whole command line (a list,
  or a string for bash). `env`: the environment (default `run_env()`). The log
  goes next to a local workdir, else into `log_dir`; the process runs in `cwd`.
  """

  def __init__(self, args: list[str], workdir, cmd=None, env=None, name: str = "",
               cwd: str = REPO, log_dir=None):
    self.workdir = str(workdir)
    prefix = (os.path.join(str(log_dir), os.path.basename(self.workdir)) if log_dir
              else self.workdir)
    self.log_path = f"{prefix}.{name}{time.monotonic_ns()}.log"
    self._log = open(self.log_path, "wb")
    if isinstance(cmd, str):
      cmd = ["bash", "-c", cmd]
    self.proc = subprocess.Popen(cmd or [sys.executable, "-m", "flowdiff_jax.main", *args],
                                 cwd=cwd, env=env or run_env(), stdout=self._log,
                                 stderr=subprocess.STDOUT)
    self.start = time.monotonic()

  def text(self) -> str:
    with open(self.log_path, errors="replace") as f:
      return f.read()

  def kill(self):
    if self.proc.poll() is None:
      self.proc.kill()  # it handles SIGTERM itself
      self.proc.wait()

  def _fail(self, why: str):
    self.kill()
    pytest.fail(f"{why}\n--- {self.log_path} ---\n{self.text()[-4000:]}")

  def wait(self, returncode: int = 0) -> str:
    """Waits for the exit, checks its status; the log."""
    try:
      self.proc.wait(timeout=max(1.0, TIMEOUT_S - (time.monotonic() - self.start)))
    except subprocess.TimeoutExpired:
      self._fail(f"timed out after {TIMEOUT_S}s")
    self._log.close()
    if self.proc.returncode != returncode:
      self._fail(f"exit status {self.proc.returncode}, expected {returncode}")
    return self.text()

  def wait_for_step(self, step: int) -> None:
    """Returns once step `step` is logged (log_every_steps=1); fails if the run ends first."""
    while f"] [{step}] train/" not in self.text():
      if self.proc.poll() is not None:
        self._fail(f"exited with {self.proc.returncode} before step {step}")
      if time.monotonic() - self.start > TIMEOUT_S:
        self._fail(f"no step {step} after {TIMEOUT_S}s")
      time.sleep(0.05)

  def kill_after(self, step: int, sig: int) -> int:
    """Sends `sig` once step `step` is logged; returns the step the run saved and stopped at."""
    self.wait_for_step(step)
    self.proc.send_signal(sig)
    log = self.wait(returncode=128 + sig)
    stopped = re.search(rf"Stopped by {signal.Signals(sig).name} after step (\d+) of", log)
    assert stopped, log[-3000:]
    return int(stopped.group(1))


def arrays(workdir, step: int | None = None) -> dict:
  """A checkpoint's arrays (step, params, ema_params, opt_state) as numpy; the newest by default.

  `workdir`: a local folder or any path epath reaches (gs://...).
  """
  step = max(steps(workdir)) if step is None else step
  path = epath.Path(str(workdir)) / "checkpoints" / str(step) / "state"
  checkpointer = ocp.PyTreeCheckpointer()
  tree = checkpointer.metadata(path).item_metadata.tree
  as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
  return checkpointer.restore(path, args=ocp.args.PyTreeRestore(restore_args=as_numpy))


def steps(workdir) -> list[int]:
  """The checkpoint steps in a workdir, oldest first."""
  return sorted(int(d.name) for d in (epath.Path(str(workdir)) / "checkpoints").iterdir()
                if d.name.isdigit())


def assert_same_arrays(got: dict, want: dict) -> None:
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(want), jax.tree.leaves(got),
                          strict=True):
    np.testing.assert_array_equal(b, a, err_msg=jax.tree_util.keystr(path))


def truncate_all(folder: str) -> dict[str, int]:
  """Cuts every file in `folder` to half its size (as an interrupted copy leaves them).

  One file is not enough: the bytes a restore reads may all lie in its first half.
  """
  sizes = {}
  for name in os.listdir(folder):
    sizes[name] = os.path.getsize(os.path.join(folder, name)) // 2
    os.truncate(os.path.join(folder, name), sizes[name])
  return sizes
