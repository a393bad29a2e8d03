"""`python -m flowdiff_jax.evaluate` end to end on a tiny run; the Fashion-MNIST classifier.

The run is a checkpoint of a tiny flowdiff state with random params (nothing
is trained or compiled to make it): evaluation only needs a restorable run.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flowdiff_jax import (
  checkpoint,
  data,
  evaluate,
  inverse,
  operators,
  runs,
  sampling,
  solvers,
  step as step_lib,
)
from flowdiff_jax.configs import tiny
from flowdiff_jax.models import classifier

FMNIST_DIR = "/usr/share/datasets/fashion-mnist"


def _save_run(method: str, workdir: str):
  """A step-0 checkpoint of a tiny `method` run with random params, and a few TensorBoard scalars.

  The state's shapes come from `jax.eval_shape` and its params are random
  numbers: compiling the real init (or running it op by op) would cost more
  than the evaluation it feeds. Small random values keep the flow invertible
  (its 1x1 convolutions are P L (U + diag(sign exp(log_s))) with constant signs).
  """
  from clu import metric_writers

  config = tiny.get_config()
  config.method = method
  config.data.fmnist_idx_dir = ""  # the (mocked) tfds source
  train_iter = iter(data.train_dataset(config, data.make_source(config, "train")))
  batch = data.prepare_batch(next(train_iter), operators.make_operator(config.operator),
                             config.data.corruption_seed, keep_clean=True)
  abstract = jax.eval_shape(
      lambda b: step_lib.create_train_state(config, jax.random.key(0), b), batch)
  rng = np.random.default_rng(0)
  state = abstract.replace(
      step=jnp.zeros((), jnp.int32),
      params=jax.tree.map(lambda a: rng.normal(0, 0.05, a.shape).astype(a.dtype),
                          abstract.params),
      ema_params=jax.tree.map(lambda a: rng.normal(0, 0.05, a.shape).astype(a.dtype),
                              abstract.ema_params),
      opt_state=jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), abstract.opt_state))
  manager = checkpoint.make_manager(workdir, config)
  checkpoint.save(manager, state, train_iter, config)
  manager.wait_until_finished()
  manager.close()
  writer = metric_writers.create_default_writer(workdir)
  for step in (1, 2):
    writer.write_scalars(step, {"train/loss": 1.0 / step, "train/beta_prior": 0.5,
                                "eval/dsm_loss_clean": 0.1 * step})
  writer.write_images(2, {"samples": np.zeros((1, 4, 4, 1), np.uint8)})
  writer.flush()


def _options(tmp_path):
  return evaluate.Options(
      output=str(tmp_path / "eval"), num_samples=10, batch_size=8, num_reference=16,
      num_posterior_images=8, posterior_samples=2, posterior_batch_size=8, kid_subsets=3,
      kid_subset_size=8)


@pytest.mark.slow
def test_evaluate_flowdiff_run_end_to_end(tmp_path, mock_fashion_mnist):
  workdir = str(tmp_path / "run")
  _save_run("flowdiff", workdir)
  results = evaluate.evaluate_run(workdir, _options(tmp_path))
  out = tmp_path / "eval"
  assert sorted(os.listdir(out)) == ["metrics.json", "metrics.md", "posterior.png",
                                     "samples.png", "training_curves.png"]
  assert json.loads((out / "metrics.json").read_text()) == json.loads(json.dumps(results))

  post = results["posterior"]
  assert post["num_images"] == 8 and post["num_samples"] == 2
  # σ_y = 0.2 on [-1, 1]: the observation's MSE is 0.04, i.e. 10 log10(4 / 0.04) = 20 dB;
  # for denoising A⁺y = y.
  assert post["observation/psnr"]["mean"] == pytest.approx(20.0, abs=0.3)
  assert post["pinv/psnr"]["mean"] == pytest.approx(post["observation/psnr"]["mean"])
  assert np.isfinite(post["posterior_mean/psnr"]["mean"])
  # Denoising: the prior's own Tweedie E[x | y] is a row (tests/test_inverse.py checks its value).
  assert np.isfinite(post["prior_tweedie/psnr"]["mean"])
  assert -1 <= post["posterior_mean/ssim"]["mean"] <= 1 and post["posterior_std"]["mean"] > 0
  # Calibration numbers: coverages are fractions that grow with k; the residual ratio is positive.
  assert 0 <= post["coverage_1std"]["mean"] <= post["coverage_2std"]["mean"] <= 1
  assert post["residual_ratio"]["mean"] > 0

  gen = results["generation"]
  assert gen["settings"]["num_samples"] == 10 and gen["settings"]["num_reference"] == 16
  assert gen["settings"]["feature_networks"] == ["fmnist"]  # no Inception weights given
  assert set(gen["rows"]) == {"samples", "clean_train", "pinv_train"}
  for row in gen["rows"].values():
    assert row["num_images"] == 10  # the reference rows use as many images as were sampled
    for key in ("fd_fmnist", "kid_fmnist", "kid_fmnist_std", "pixel_mean_rmse",
                "pixel_cov_rel_error"):
      assert np.isfinite(row[key]), key
    assert row["fd_fmnist"] > 0
  md = (out / "metrics.md").read_text()
  header = next(line for line in md.splitlines() if line.startswith("| images |"))
  assert "FD-FMNIST" in header and "FID" not in header  # never called FID
  assert "| posterior mean |" in md and "**prior samples** (10)" in md
  assert "| the diffusion prior's E[x | y] (Tweedie, one pass) |" in md
  assert "Calibration: the error is within 1 / 2 posterior stds" in md


def test_sections_per_method():
  """Posterior rows need a flow, generation a trained prior."""
  assert evaluate.sections("flowdiff") == ("posterior", "generation")
  assert evaluate.sections("amortized") == ("posterior",)
  assert evaluate.sections("naive") == evaluate.sections("clean") == ("generation",)


def test_read_scalars_reads_clu_event_files(tmp_path, mock_fashion_mnist):
  from clu import metric_writers

  writer = metric_writers.create_default_writer(str(tmp_path))
  writer.write_scalars(3, {"train/loss": 2.0})
  writer.write_scalars(6, {"train/loss": 1.5, "eval/psnr_observation": 20.0})
  writer.write_images(6, {"samples": np.zeros((1, 4, 4, 1), np.uint8)})
  writer.flush()
  scalars = evaluate.read_scalars(str(tmp_path))
  assert set(scalars) == {"train/loss", "eval/psnr_observation"}
  np.testing.assert_array_equal(scalars["train/loss"][0], [3, 6])
  np.testing.assert_allclose(scalars["train/loss"][1], [2.0, 1.5])
  assert evaluate.plot_curves(scalars, str(tmp_path / "curves.png"), "test")
  assert os.path.getsize(tmp_path / "curves.png") > 1000


def _classify_idx_test_set(idx_dir: str, n: int):
  """(predicted classes, labels, images in [-1, 1]) of the first n t10k images in `idx_dir`."""
  params = classifier.load_params()
  images = data.read_idx_images(os.path.join(idx_dir, "t10k-images-idx3-ubyte.gz"))[:n]
  labels = classifier.read_idx_labels(os.path.join(idx_dir, "t10k-labels-idx1-ubyte.gz"))[:n]
  x = images.astype(np.float32) / 127.5 - 1.0
  logits = np.asarray(classifier.logits(params, x))
  assert logits.shape == (len(x), 10) and np.isfinite(logits).all()
  return np.argmax(logits, -1), labels, x


def test_committed_classifier_weights_load_and_classify_idx_files(fmnist_idx_dir):
  """The weights FD-FMNIST uses load, and classify and embed images read from idx files."""
  assert os.path.getsize(classifier.DEFAULT_WEIGHTS) < 2_000_000
  predicted, labels, x = _classify_idx_test_set(fmnist_idx_dir, 64)
  assert labels.shape == (64,) and set(labels.tolist()) <= set(range(10))
  assert set(predicted.tolist()) <= set(range(10))
  features = classifier.make_feature_fn(classifier.load_params())(x[:4])
  assert features.shape == (4, classifier.FEATURE_DIM) and np.isfinite(features).all()


@pytest.mark.skipif(not os.path.exists(os.path.join(FMNIST_DIR, "t10k-labels-idx1-ubyte.gz")),
                    reason="needs the real Fashion-MNIST test set (Debian package "
                    "dataset-fashion-mnist); the generated one cannot measure accuracy")
def test_committed_classifier_weights_classify_real_fashion_mnist():
  """On the real held-out images the weights reach their accuracy (README)."""
  predicted, labels, _ = _classify_idx_test_set(FMNIST_DIR, 1000)
  assert np.mean(predicted == labels) > 0.85


def test_classifier_weights_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="experiments/fmnist_classifier/train.py"):
    classifier.load_params(str(tmp_path / "none.msgpack"))
  params = classifier.load_params()
  params["features"]["kernel"] = params["features"]["kernel"][:10]
  classifier.save_params(str(tmp_path / "bad.msgpack"), params)
  with pytest.raises(ValueError, match="does not hold FMNISTClassifier params"):
    classifier.load_params(str(tmp_path / "bad.msgpack"))


@pytest.mark.slow
def test_inverse_denoising_has_the_priors_tweedie_row(tmp_path, mock_fashion_mnist):
  """inverse.evaluate_task's "tweedie" row is `sampling.tweedie_posterior_mean` of the run's
  EMA prior on the same observations (no solver needed); other tasks have no such row."""
  workdir = str(tmp_path / "run")
  _save_run("flowdiff", workdir)
  config, state = runs.load_run(workdir)
  op = operators.Denoise(sigma_y=0.2)
  raw = next(iter(data.train_dataset(config, data.make_source(config, "train"))))
  images = np.asarray(raw["image"][:4], np.float32) / 127.5 - 1.0
  index = np.arange(4)
  result = inverse.evaluate_task(state, images, index, op, [], batch_size=4, flow=False, log=None)
  assert set(result["rows"]) == {"observation", "tweedie"}
  y = operators.corrupt(op, jnp.asarray(images), jnp.asarray(index), inverse.CORRUPTION_SEED)["y"]
  eps = solvers.NetworkEps(state.objective)
  params = inverse.prior_params(state)
  want = sampling.tweedie_posterior_mean(lambda x_t, t: eps(params, x_t, t),
                                         state.objective.schedule, y, 0.2)
  np.testing.assert_allclose(result["images"]["tweedie"], want, atol=1e-5)
  blur = operators.GaussianBlur(sigma_y=0.05, kernel_size=3, kernel_std=1.0)
  assert "tweedie" not in inverse.evaluate_task(state, images, index, blur, [], batch_size=4,
                                                flow=False, log=None)["rows"]
