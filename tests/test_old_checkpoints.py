"""Checkpoints written by the code before the `methods/` refactor still restore and resume.

tests/data/checkpoints_9c9f15a holds two 2-step tiny runs (flowdiff, naive)
saved by commit 9c9f15a (its README has the command). Today's code must read
every array back with the same values (not merely the same shapes, which a
fresh initialization would also have), and the training program must resume
them.
"""

import os
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from flowdiff_jax import runs, train

OLD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "checkpoints_9c9f15a")


def _stored_arrays(workdir: str) -> dict:
  """The state arrays of step 2 as orbax reads them without a template (host numpy)."""
  with ocp.CheckpointManager(os.path.join(workdir, "checkpoints"),
                             item_names=("state",)) as manager:
    return manager.restore(2, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]


def _by_name(tree) -> dict:
  """{"a/b/0/count": leaf}: names that read the same for dicts, lists and namedtuples.

  orbax restores optax's namedtuple states as dicts when it has no template.
  """
  def name(entry):
    for attr in ("key", "name", "idx"):
      if hasattr(entry, attr):
        return str(getattr(entry, attr))
    return str(entry)

  return {"/".join(name(e) for e in path): leaf
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


@pytest.mark.parametrize("method,networks", [("flowdiff", {"flow", "score"}),
                                             ("naive", {"score"})])
def test_load_run_restores_every_array_of_an_old_checkpoint(method, networks):
  workdir = os.path.join(OLD, method)
  config, state = runs.load_run(workdir)
  assert config.method == method and int(state.step) == 2
  assert set(state.params) == networks
  stored = _stored_arrays(workdir)
  restored = {"params": state.params, "ema_params": state.ema_params,
              "opt_state": state.opt_state}
  flat_stored = _by_name({k: stored[k] for k in restored})
  flat_restored = _by_name(restored)
  assert flat_restored.keys() == flat_stored.keys() and flat_stored
  for name, value in flat_stored.items():
    np.testing.assert_array_equal(np.asarray(flat_restored[name]), np.asarray(value),
                                  err_msg=name)


def test_old_naive_checkpoint_is_a_prior():
  config, prior = runs.load_prior(os.path.join(OLD, "naive"))
  stored = _stored_arrays(os.path.join(OLD, "naive"))
  np.testing.assert_array_equal(
      jax.tree.leaves(prior)[0], jax.tree.leaves(stored["ema_params"]["score"])[0])
  assert config.method == "naive"


@pytest.mark.slow
@pytest.mark.parametrize("method", ["flowdiff", "naive"])
def test_training_resumes_an_old_checkpoint(method, tmp_path, fmnist_idx_dir):
  workdir = tmp_path / method
  shutil.copytree(os.path.join(OLD, method), workdir)
  config = runs.load_config(str(workdir))
  config.training.num_train_steps = 3
  # The run read the Debian Fashion-MNIST files; here the generated ones, with
  # the same 16 examples per epoch, stand in (a change outside the resumable
  # fields, hence allow_config_change).
  config.data.fmnist_idx_dir = fmnist_idx_dir
  config.data.read_threads = 1
  before = _stored_arrays(str(workdir))
  state = train.train_and_evaluate(config, str(workdir), allow_config_change=True)
  assert int(state.step) == 3
  # It went on from the old state: one more update of the score network.
  old = jax.tree.leaves(before["params"]["score"])
  new = jax.tree.leaves(state.params["score"])
  assert all(a.shape == b.shape for a, b in zip(old, new))
  assert any(not np.array_equal(a, np.asarray(b)) for a, b in zip(old, new))
  assert np.isfinite(np.concatenate([np.ravel(b) for b in new])).all()
