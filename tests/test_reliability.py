"""Reliability (issue 8): preemption, damaged checkpoints, divergence, another run's workdir.

Runs are launched as users launch them (`python -m flowdiff_jax.main`) on
generated Fashion-MNIST idx files (conftest's fmnist_idx_dir), with real
SIGTERM/SIGINT, and the tests look at the files each run leaves in its workdir.
Every run is tiny (a one-level U-Net, 1 CPU device); the uninterrupted
reference runs are shared by the tests of a method, and independent runs
overlap (a 2-core machine compiles two at once).
"""

import os
import random
import re
import shutil
import signal
import sys

import jax
import numpy as np
import pytest

from runs_testing import REPO, Run, arrays, assert_same_arrays, steps, truncate_all

# data.fmnist_idx_dir of every run: the generated files of conftest's fmnist_idx_dir
# fixture, set by _use_generated_fashion_mnist below.
IDX_DIR = None
# Steps of the runs: clean is killed several times, flowdiff once (its compile costs more).
STEPS = {"clean": 20, "flowdiff": 8}
# Random kill points; set RELIABILITY_SEED to try others.
SEED = int(os.environ.get("RELIABILITY_SEED", "0"))

# Every test trains (several runs of a program that compiles for tens of seconds).
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", autouse=True)
def _use_generated_fashion_mnist(fmnist_idx_dir):
  """IDX_DIR is the generated Fashion-MNIST for this module's runs (before `references`)."""
  global IDX_DIR
  IDX_DIR = fmnist_idx_dir
  yield
  IDX_DIR = None


def _flags(method: str, workdir, steps: int, **overrides) -> list[str]:
  """Command-line flags of a tiny run; `overrides` are more config fields (name=value)."""
  assert IDX_DIR, "set by the autouse fixture _use_generated_fashion_mnist"
  fields = {
      "method": method, "training.num_train_steps": steps, "training.batch_size": 8,
      "data.max_train_examples": 64, "data.fmnist_idx_dir": IDX_DIR, "data.read_threads": 1,
      # One log line per step: how the tests see where a run is (and logging
      # does not change what is trained).
      "training.log_every_steps": 1,
      # No periodic checkpoint except where a test asks: a resumed run then
      # starts from the checkpoint that its kill wrote, at whatever step that was.
      "training.checkpoint_every_steps": 1000,
      "training.eval_every_steps": 0, "training.sample_every_steps": 0,
      "eval.nll_time_samples": 1,  # flow methods still evaluate once, at the end
      # The smallest networks: compiling is what these tests pay for.
      "model.channel_mult": "(1,)", "model.attn_resolutions": "()", "flow.num_levels": 1,
      **overrides}
  return ([f"--config={os.path.join(REPO, 'configs', 'tiny.py')}", f"--workdir={workdir}"]
          + [f"--config.{k}={v}" for k, v in fields.items()])


# Periodic checkpoints of the clean runs, for the damaged-checkpoint test.
CLEAN = {"training.checkpoint_every_steps": 6}
REFERENCE_FIELDS = {"clean": CLEAN, "flowdiff": {}}


class References:
  """Uninterrupted runs, started on first use and shared by the tests of a method."""

  def __init__(self, root):
    self.root, self.runs = root, {}

  def start(self, method: str) -> Run:
    if method not in self.runs:
      workdir = self.root / method
      self.runs[method] = Run(_flags(method, workdir, STEPS[method], **REFERENCE_FIELDS[method]),
                              workdir)
    return self.runs[method]

  def workdir(self, method: str) -> str:
    run = self.start(method)
    if run.proc.returncode is None:
      run.wait()
    return run.workdir


@pytest.fixture(scope="module")
def references(tmp_path_factory):
  refs = References(tmp_path_factory.mktemp("reference"))
  yield refs
  for run in refs.runs.values():
    if run.proc.poll() is None:
      run.proc.kill()
      run.proc.wait()


def test_kills_at_random_steps_resume_bit_identical(references, tmp_path):
  """Fault injection, "clean": SIGTERM, SIGINT, SIGTERM at random steps, each run resumed
  by the same command; the last one ends at the uninterrupted run's exact arrays."""
  rng = random.Random(SEED)
  references.start("clean")  # runs while the first kill run starts
  args = _flags("clean", tmp_path / "run", STEPS["clean"], **CLEAN)
  stopped_at = [0]
  for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGTERM):
    run = Run(args, tmp_path / "run")  # the first overlaps the reference run's start
    stop = run.kill_after(stopped_at[-1] + rng.randint(1, 3), sig)
    assert stop > stopped_at[-1], run.text()[-3000:]
    if stopped_at[-1]:
      assert f"Resumed from step {stopped_at[-1]} " in run.text()
    # The checkpoint of the step it stopped at: state, data position, config.
    saved = os.path.join(run.workdir, "checkpoints", str(stop))
    assert sorted(os.listdir(saved)) == ["_CHECKPOINT_METADATA", "commit_success.txt",
                                         "config", "data", "state"]
    with open(os.path.join(saved, "data", "process_0-of-1.json")) as f:
      assert f'"next_index": {stop}' in f.read()  # batches read so far
    stopped_at.append(stop)
  assert stopped_at[-1] < STEPS["clean"]
  # Kills between the periodic saves: every resume starts from its kill's checkpoint.
  assert any(s % CLEAN["training.checkpoint_every_steps"] for s in stopped_at[1:]), stopped_at
  log = Run(args, tmp_path / "run").wait()
  assert f"Resumed from step {stopped_at[-1]} " in log
  want = arrays(references.workdir("clean"))
  assert_same_arrays(arrays(tmp_path / "run"), want)
  assert int(want["step"]) == STEPS["clean"]


def test_flowdiff_resumes_bit_identical_after_sigterm(references, tmp_path):
  references.start("flowdiff")
  args = _flags("flowdiff", tmp_path / "run", STEPS["flowdiff"])
  stop = Run(args, tmp_path / "run").kill_after(random.Random(SEED).randint(1, 3),
                                                signal.SIGTERM)
  assert steps(tmp_path / "run") == [stop]
  log = Run(args, tmp_path / "run").wait()
  assert f"Resumed from step {stop} " in log
  assert_same_arrays(arrays(tmp_path / "run"), arrays(references.workdir("flowdiff")))


def test_damaged_checkpoints_are_skipped_and_kept(references, tmp_path):
  """Truncated array files (step 20), a deleted file (step 18) and an unfinished save: the
  run resumes from step 12, moves the three aside intact, and still ends at the reference."""
  reference = references.workdir("clean")
  assert steps(reference) == [12, 18, 20]
  want = arrays(reference)
  work = tmp_path / "run"
  shutil.copytree(reference, work, ignore=shutil.ignore_patterns("events.out.*"))
  checkpoints = os.path.join(work, "checkpoints")
  data_files = os.path.join("20", "state", "ocdbt.process_0", "d")  # the arrays' bytes
  sizes = truncate_all(os.path.join(checkpoints, data_files))
  os.remove(os.path.join(checkpoints, "18", "data", "process_0-of-1.json"))
  partial = "21.orbax-checkpoint-tmp-1795900000000000"  # a save killed mid-write
  shutil.copytree(os.path.join(checkpoints, "12"), os.path.join(checkpoints, partial),
                  ignore=shutil.ignore_patterns("commit_success.txt", "_METADATA"))

  # keep_checkpoints=1: were the damaged steps still counted, orbax would delete
  # step 12, the only good one, at the first save.
  log = Run(_flags("clean", work, STEPS["clean"], **CLEAN,
                   **{"training.keep_checkpoints": 1}), work).wait()
  assert "Checkpoint step 21 in" in log and "was never finished" in log
  assert re.search(r"Checkpoint step 20 in .* does not read back", log)
  assert re.search(r"Checkpoint step 18 in .* does not read back", log)
  assert re.search(r"Resuming from step 12, the newest complete checkpoint in .*; skipped "
                   r"step 20, 18, moved to .*corrupt_checkpoints", log)
  assert "Training clean on fashion_mnist/denoise from step 12 to 20" in log
  # Evidence kept as it was left; orbax no longer sees it.
  corrupt = os.path.join(work, "corrupt_checkpoints")
  assert sorted(os.listdir(corrupt)) == ["18", "20", partial]
  assert {name: os.path.getsize(os.path.join(corrupt, data_files, name))
          for name in sizes} == sizes
  assert not os.path.exists(os.path.join(corrupt, "18", "data", "process_0-of-1.json"))
  assert os.listdir(checkpoints) == ["20"]  # the new step 20 (keep_checkpoints=1)
  assert_same_arrays(arrays(work), want)


def test_no_readable_checkpoint_stops_and_moves_nothing(references, tmp_path):
  """Every checkpoint damaged: restore_latest lists them and moves none (in-process)."""
  from flowdiff_jax import checkpoint, data, runs, step as step_lib

  work = tmp_path / "run"
  shutil.copytree(references.workdir("clean"), work, ignore=shutil.ignore_patterns("events.*"))
  for step in steps(work):
    truncate_all(os.path.join(work, "checkpoints", str(step), "state", "ocdbt.process_0", "d"))
  config = runs.load_config(str(work))
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  state = jax.tree.map(
      lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device),
      jax.eval_shape(lambda: step_lib.create_train_state(
          config, jax.random.key(0), {"x": jax.ShapeDtypeStruct((8, 28, 28, 1), np.float32)})))
  manager = checkpoint.make_manager(str(work), config)
  with pytest.raises(RuntimeError, match=r"(?s)No checkpoint in .* reads back:\n  step 20: .*"
                     r"\n  step 18: .*\n  step 12: .*None of them was moved or deleted"):
    checkpoint.restore_latest(manager, state, iter(data.train_dataset(config)), config=config)
  manager.close()
  assert steps(work) == [12, 18, 20]
  assert not os.path.exists(os.path.join(work, checkpoint.CORRUPT_DIR))


def test_another_runs_workdir_is_refused(references, tmp_path):
  """Other model shapes or operator: refused before anything compiles, every differing field
  listed; --allow_config_change resumes; arrays of other shapes are refused even then."""
  reference = references.workdir("clean")
  before = sorted(os.listdir(os.path.join(reference, "checkpoints")))
  shutil.copytree(reference, tmp_path / "allowed", ignore=shutil.ignore_patterns("events.*"))
  refused = Run(_flags("clean", reference, 30, **CLEAN, **{
      "model.base_channels": 16, "operator.sigma_y": 0.1}), reference)
  allowed = Run(_flags("clean", tmp_path / "allowed", STEPS["clean"] + 1, **CLEAN, **{
      "data.shuffle_seed": 1}) + ["--allow_config_change"], tmp_path / "allowed")

  log = refused.wait(returncode=2)
  assert "2 field(s) differ (checkpoint -> this run):" in log
  assert "config.model.base_channels: 8 -> 16" in log
  assert "config.operator.sigma_y: 0.2 -> 0.1" in log
  assert "num_train_steps: 20 -> 30" not in log  # a field that may change on resume
  assert "--allow_config_change" in log and "Training clean" not in log
  assert sorted(os.listdir(os.path.join(reference, "checkpoints"))) == before

  # Even when allowed, a checkpoint whose arrays are not the state's is refused,
  # never taken for a damaged one and moved (checked here without a training run).
  from flowdiff_jax import checkpoint, runs, step as step_lib

  config = runs.load_config(reference)  # the stored config, as resumed
  config.model.base_channels = 16
  batch = {"x": jax.ShapeDtypeStruct((8, 28, 28, 1), np.float32)}
  state = jax.eval_shape(lambda: step_lib.create_train_state(config, jax.random.key(0), batch))
  manager = checkpoint.make_manager(reference, config)
  with pytest.raises(checkpoint.IncompatibleCheckpointError,
                     match=r"(?s)step 20 .* holds other arrays than this run's state \(\d+ "
                           r"differ\):\n  params\.score\.\S+: float32\[8\] in the checkpoint, "
                           r"float32\[16\] in this run.*even with --allow_config_change"):
    checkpoint.restore_latest(manager, state, None, config=config, allow_config_change=True)
  manager.close()
  assert sorted(os.listdir(os.path.join(reference, "checkpoints"))) == before
  assert not os.path.exists(os.path.join(reference, checkpoint.CORRUPT_DIR))

  log = allowed.wait()
  assert re.search(r"--allow_config_change: resuming step 20 .* 1 changed field", log)
  assert "config.data.shuffle_seed: 0 -> 1" in log and "Resumed from step 20 " in log
  assert steps(tmp_path / "allowed")[-1] == STEPS["clean"] + 1


def test_another_process_count_is_refused_then_continues_the_data_order(references, tmp_path):
  """Step 12 as if written by 2 processes (the data file of each, as grain names them):
  refused before anything compiles, saying why and how; --allow_process_count_change
  takes the position from those files and ends at the uninterrupted run's arrays."""
  reference = references.workdir("clean")
  work = tmp_path / "run"
  shutil.copytree(reference, work, ignore=shutil.ignore_patterns("events.*"))
  for step in (18, 20):
    shutil.rmtree(os.path.join(work, "checkpoints", str(step)))
  data_dir = os.path.join(work, "checkpoints", "12", "data")
  one = os.path.join(data_dir, "process_0-of-1.json")
  with open(one) as f:
    assert '"next_index": 12' in f.read()  # batches consumed: the same on every process
  for p in range(2):
    shutil.copy(one, os.path.join(data_dir, f"process_{p}-of-2.json"))
  os.remove(one)

  log = Run(_flags("clean", work, STEPS["clean"], **CLEAN), work).wait(returncode=2)
  assert re.search(r"Checkpoint step 12 in .* was written by 2 JAX process\(es\); this run "
                   r"has 1\..*--allow_process_count_change", log)
  assert "Training clean" not in log and steps(work) == [12]

  log = Run(_flags("clean", work, STEPS["clean"], **CLEAN) + ["--allow_process_count_change"],
            work).wait()
  assert "written by 2 processes, this run has 1 (--allow_process_count_change): the data " \
         "order continues from global batch 12" in log
  assert "Training clean on fashion_mnist/denoise from step 12 to 20" in log
  assert_same_arrays(arrays(work), arrays(reference))


# Poisons the prior term of the amortized loss (and so the gradient) at chosen
# steps, then runs the command line as users do.
_POISONED_MAIN = """
import sys
import flowdiff_jax  # its XLA workarounds, before jax starts
import jax.numpy as jnp
from absl import app
from flowdiff_jax import main, step as step_lib

make_loss_fn = step_lib.make_loss_fn

def poisoned_loss_fn(obj, batch, step, rng, axis_name=None):
  loss_fn = make_loss_fn(obj, batch, step, rng, axis_name)
  # step = updates so far: the loop's steps 3, 4 and 7 on are bad.
  poison = jnp.where((step == 2) | (step == 3) | (step >= 6), jnp.nan, 1.0)

  def fn(params):
    loss, terms = loss_fn(params)
    return loss * poison, dict(terms, prior_nll=terms["prior_nll"] * poison)
  return fn

step_lib.make_loss_fn = poisoned_loss_fn
sys.argv[0] = "flowdiff_jax.main"
app.run(main.main)
"""


def test_non_finite_steps_are_skipped_then_the_run_stops(tmp_path):
  """Bad steps 3-4 are skipped and the run goes on; bad steps 7-10 stop it (limit 3, judged
  at the step-10 checkpoint, not per step), naming the term; checkpoints 4, 6, 8 stay.

  The amortized flow (against the tiny config's Gaussian prior) has the loss terms
  of FlowDiff's flow and compiles in a fraction of its time.
  """
  work = tmp_path / "run"
  args = _flags("amortized", work, 12, **{
      "training.max_consecutive_nonfinite_steps": 3, "training.log_every_steps": 4,
      "training.checkpoint_every_steps": 2})
  log = Run([], work, cmd=[sys.executable, "-c", _POISONED_MAIN, *args]).wait(returncode=3)
  assert re.search(r"Skipped the non-finite update of step\(s\) 3, 4 \(2 in a row", log)
  message = log[log.index("Training diverged"):].splitlines()[0]
  assert message.startswith(
      "Training diverged: the updates of the last 4 steps (7-10) were skipped as non-finite, "
      "and training.max_consecutive_nonfinite_steps=3. Non-finite: train/prior_nll (from step "
      "7), train/prior_nll_bpd (from step 7), train/grad_norm (from step 7). 6 update(s) were "
      "skipped in this run. The newest checkpoint, step 8 in "), message
  # Nothing saved after the divergence; skipped steps left every array as it was.
  assert steps(work) == [4, 6, 8]
  at = {step: arrays(work, step) for step in (4, 6, 8)}
  assert [int(at[s]["step"]) for s in (4, 6, 8)] == [4, 6, 8]
  for tree in ("params", "ema_params", "opt_state"):
    assert_same_arrays(at[8][tree], at[6][tree])  # steps 7, 8 skipped
  assert any(not np.array_equal(a, b) for a, b in zip(  # steps 5, 6 applied
      jax.tree.leaves(at[6]["params"]), jax.tree.leaves(at[4]["params"])))
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(at[8]))
