"""End to end: the training program runs every method and fails fast offline.

Kill-and-resume (real signals, bit-identical parameters) is in test_reliability.py.
"""

import glob
import os
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from flowdiff_jax import data, parallel, runs, step as step_lib, train
from flowdiff_jax.configs import tiny

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tiny(method="naive", steps=4):
  config = tiny.get_config()
  config.method = method
  config.data.fmnist_idx_dir = ""  # use the (mocked) tfds source
  config.training.num_train_steps = steps
  return config


def _leaves(state):
  return jax.tree.leaves(jax.device_get((state.params, state.ema_params, state.opt_state)))


@pytest.mark.parametrize("method", ["clean", "naive"])
@pytest.mark.slow
def test_diffusion_method_runs_end_to_end(method, tmp_path, mock_fashion_mnist):
  state = train.train_and_evaluate(_tiny(method), str(tmp_path))
  assert int(state.step) == 4
  assert all(np.isfinite(x).all() for x in _leaves(state))
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2", "4"]
  assert glob.glob(str(tmp_path / "events.out.tfevents.*"))
  assert os.path.exists(tmp_path / "samples" / "step_0000004.png")


@pytest.mark.slow
def test_cifar_noise_config_trains_on_mock_cifar(tmp_path, monkeypatch):
  """configs/cifar_noise.py as the users run it, with the model and batch shrunk for a CPU."""
  from flowdiff_jax.configs import cifar_noise

  monkeypatch.setattr(data, "_download_reachable", lambda url, timeout_s=5.0: True)
  config = cifar_noise.get_config()
  config.model.update(base_channels=8, channel_mult=(1, 2), num_res_blocks=1,
                      attn_resolutions=(16,), num_groups=4)
  config.flow.update(num_steps=1, hidden_channels=8, cond_channels=4)  # flowdiff: CPU-sized
  config.training.update(batch_size=8, num_train_steps=2, eval_every_steps=0,
                         sample_every_steps=0)
  config.data.num_eval_examples = 8  # the final posterior evaluation on mock test images
  config.eval.batch_size = 8
  with tfds.testing.mock_data(num_examples=16):
    state = train.train_and_evaluate(config, str(tmp_path))
  assert int(state.step) == 2


@pytest.mark.slow
def test_users_cifar_command_fails_fast_offline(tmp_path):
  """The users' exact command, with no dataset and no network, stops at once with the data error."""
  env = dict(os.environ, http_proxy="http://127.0.0.1:9", https_proxy="http://127.0.0.1:9",
             HTTP_PROXY="http://127.0.0.1:9", HTTPS_PROXY="http://127.0.0.1:9",
             XLA_FLAGS="", JAX_PLATFORMS="cpu")
  start = time.time()
  proc = subprocess.run(
      [sys.executable, "-m", "flowdiff_jax.main", "--config=configs/cifar_noise.py",
       f"--workdir={tmp_path / 'run'}", f"--config.data.data_dir={tmp_path / 'tfds'}"],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  elapsed = time.time() - start
  assert proc.returncode != 0
  assert "DatasetUnavailableError: Dataset 'cifar10' is not available" in proc.stderr
  assert "tfds build cifar10" in proc.stderr
  assert elapsed < 120, f"took {elapsed:.0f}s"


def test_corrupted_data_methods_never_see_clean_images():
  mesh = parallel.make_mesh(jax.devices()[:1])
  raw = {"image": np.zeros((8, 28, 28, 1), np.uint8), "index": np.arange(8, dtype=np.int32)}
  for method in ("naive", "amortized", "flowdiff"):
    batch = train._make_prepare(_tiny(method), mesh, for_eval=False)(raw)
    assert set(batch) == {"y", "omega"}, method
  clean = train._make_prepare(_tiny("clean"), mesh, for_eval=False)(raw)
  assert set(clean) == {"x"}


def test_package_exports_the_step_function():
  import flowdiff_jax
  from flowdiff_jax import train_step

  assert train_step is step_lib.train_step
  assert flowdiff_jax.create_train_state is step_lib.create_train_state


@pytest.mark.slow
def test_amortized_with_a_gaussian_prior_runs_end_to_end(tmp_path, mock_fashion_mnist):
  config = _tiny("amortized")
  config.training.eval_every_steps = 0  # the final evaluation still runs
  state = train.train_and_evaluate(config, str(tmp_path))
  assert int(state.step) == 4
  assert set(state.params) == {"flow", "prior"}
  assert all(np.isfinite(x).all() for x in _leaves(state))
  assert os.path.exists(tmp_path / "posterior" / "step_0000004.png")
  assert not os.path.exists(tmp_path / "samples")  # no trained prior to sample


@pytest.mark.slow
def test_flowdiff_runs_end_to_end(tmp_path, mock_fashion_mnist):
  config = _tiny("flowdiff")
  state = train.train_and_evaluate(config, str(tmp_path))
  assert int(state.step) == 4
  assert set(state.params) == {"flow", "score"}
  assert all(np.isfinite(x).all() for x in _leaves(state))
  for folder in ("samples", "posterior"):  # prior samples and posterior grids
    assert os.path.exists(tmp_path / folder / "step_0000004.png")
  _assert_load_run_restores(tmp_path, config, state)


def _assert_load_run_restores(workdir, config, state):
  """runs.load_run, used by the tools that take a trained run, gives back the final state."""
  loaded_config, loaded = runs.load_run(str(workdir))
  assert loaded_config.method == config.method
  assert loaded_config.to_dict() == config.to_dict()
  assert int(loaded.step) == int(state.step)
  for a, b in zip(_leaves(loaded), _leaves(state), strict=True):
    np.testing.assert_array_equal(a, b)
  with pytest.raises(FileNotFoundError, match="at step 3"):
    runs.load_run(str(workdir), step=3)


@pytest.mark.slow
def test_amortized_keeps_a_diffusion_prior_from_a_clean_run_frozen(tmp_path, mock_fashion_mnist):
  train.train_and_evaluate(_tiny("clean", steps=2), str(tmp_path / "prior"))
  _, prior = runs.load_prior(str(tmp_path / "prior"))
  config = _tiny("amortized", steps=2)
  config.amortized.prior = "diffusion"
  config.amortized.prior_workdir = str(tmp_path / "prior")
  state = train.train_and_evaluate(config, str(tmp_path / "posterior"))
  for a, b in zip(jax.tree.leaves(jax.device_get(state.params["prior"])),
                  jax.tree.leaves(jax.device_get(prior)), strict=True):
    np.testing.assert_array_equal(a, b)
  # The flow did train: its params moved away from their slowly-following EMA.
  moved = [not np.array_equal(a, b) for a, b in zip(
      jax.tree.leaves(jax.device_get(state.params["flow"])),
      jax.tree.leaves(jax.device_get(state.ema_params["flow"])))]
  assert any(moved)
  _assert_load_run_restores(tmp_path / "posterior", config, state)


def test_amortized_without_a_prior_checkpoint_says_what_to_do(tmp_path, mock_fashion_mnist):
  config = _tiny("amortized", steps=2)
  config.amortized.prior = "diffusion"
  config.amortized.prior_workdir = str(tmp_path / "missing")
  with pytest.raises(FileNotFoundError, match="train a clean or naive run there first"):
    train.train_and_evaluate(config, str(tmp_path / "posterior"))


def test_command_line_modules_import_together():
  # Each CLI defines its absl flags only when run as a program: several share
  # names (--workdir), and tests and users import them side by side.
  pass


@pytest.mark.slow
def test_profile_steps_write_a_trace_and_change_nothing_else(tmp_path, mock_fashion_mnist):
  """training.profile_steps=2: a jax.profiler trace of steps 4-5 (after the third dispatch)
  in the workdir, with the parameters of the same run without a trace."""
  plain = train.train_and_evaluate(_tiny("naive", steps=6), str(tmp_path / "plain"))
  config = _tiny("naive", steps=6)
  config.training.profile_steps = 2
  profiled = train.train_and_evaluate(config, str(tmp_path / "profiled"))
  traces = glob.glob(str(tmp_path / "profiled" / "plugins" / "profile" / "*" / "*.xplane.pb"))
  assert len(traces) == 1, traces
  with open(traces[0], "rb") as f:
    assert b"train" in f.read()  # the loop's StepTraceAnnotation of each traced step
  assert not os.path.exists(tmp_path / "plain" / "plugins")
  for a, b in zip(_leaves(plain), _leaves(profiled), strict=True):
    np.testing.assert_array_equal(a, b)
