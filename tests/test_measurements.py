"""Measurements in files: round trips to batches, masks reaching the operator, the
ground-truth-free metrics on a case with a known answer, σ_y estimation, every
bad-input message, and the README's worked example."""

import json
import os
import re
import signal
import subprocess
import sys
import textwrap

import jax
import numpy as np
from PIL import Image
import pytest

from flowdiff_jax import data, measurements, operators
from flowdiff_jax.configs import measurements as measurements_config, tiny
from flowdiff_jax.measurements import DataError
from flowdiff_jax.models import flow as flow_lib
from flowdiff_jax.validate import ConfigError, validate_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(kind, path, op="inpaint_random", batch=4, **data_fields):
  config = tiny.get_config()
  config.method = "flowdiff"
  config.data.dataset = kind
  config.data.path = str(path)
  config.operator.name = op
  config.training.batch_size = batch
  config.eval.batch_size = batch
  config.data.num_eval_examples = 64
  config.data.update(data_fields)
  return config


def _masks(n, size, seed=0):
  return (np.random.default_rng(seed).random((n, size, size)) > 0.4)


def _save_png(path, array):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(array).save(path)


def _folder(tmp_path, n=6, size=8, channels=1, masks=True):
  """uint8 images (and 0/255 masks) named img_<i>.png, written in shuffled order."""
  rng = np.random.default_rng(1)
  images = rng.integers(0, 256, (n, size, size, channels), dtype=np.uint8)
  mask = _masks(n, size)
  for i in rng.permutation(n):  # the order of writing must not matter, only the names
    _save_png(str(tmp_path / "y" / f"img_{i}.png"), images[i].squeeze(-1) if channels == 1
              else images[i])
    if masks:
      _save_png(str(tmp_path / "mask" / f"img_{i}.png"), mask[i].astype(np.uint8) * 255)
  return images, mask


# ---------------------------------------------------------------------------
# Round trips: files -> batches keep values, masks and order.
# ---------------------------------------------------------------------------


def test_npz_round_trip_keeps_values_masks_and_order(tmp_path):
  n, size = 12, 8
  y = np.random.default_rng(0).uniform(-0.2, 1.2, (n, size, size, 2)).astype(np.float32)
  mask = _masks(n, size)
  np.savez(tmp_path / "m.npz", y=y, mask=mask)
  config = _config("npz", tmp_path / "m.npz")
  want_y = (2 * y - 1) * mask[..., None]  # floats: (0, 1) -> [-1, 1]; 0 where missing
  op = operators.make_operator(config.operator)
  prepare = jax.jit(lambda raw: data.prepare_batch(raw, op, 0, keep_clean=False))

  it = iter(data.train_dataset(config, data.make_source(config, "train")))
  seen = {}
  for _ in range(2 * n // 4):  # two epochs
    batch = jax.device_get(prepare(next(it)))
    assert set(batch) == {"y", "omega", "index"} and set(batch["omega"]) == {"mask"}
    for i, idx in enumerate(batch["index"]):
      np.testing.assert_allclose(batch["y"][i], want_y[idx], atol=1e-6)
      np.testing.assert_array_equal(batch["omega"]["mask"][i, ..., 0], mask[idx])
      seen[int(idx)] = seen.get(int(idx), 0) + 1
  assert seen == {i: 2 for i in range(n)}

  evals = data.eval_batches(config)  # no reference: no "x"; file order
  assert [set(b) for b in evals] == [{"y", "mask", "index"}] * 3
  np.testing.assert_allclose(np.concatenate([b["y"] for b in evals]), want_y, atol=1e-6)
  np.testing.assert_array_equal(np.concatenate([b["mask"] for b in evals])[..., 0], mask)


def test_folder_round_trip_sorted_by_name_with_masks_and_reference(tmp_path):
  images, mask = _folder(tmp_path, n=6, size=8)
  clean = (images // 2).astype(np.uint8)
  for i in range(6):
    _save_png(str(tmp_path / "clean" / f"img_{i}.png"), clean[i, ..., 0])
  config = _config("folder", tmp_path / "y", batch=2, mask_dir=str(tmp_path / "mask"),
                   reference_path=str(tmp_path / "clean"))
  m = measurements.load(config)
  assert m.names == tuple(f"img_{i}.png" for i in range(6))  # sorted by file name
  np.testing.assert_allclose(m.y, (images / 127.5 - 1) * mask[..., None], atol=1e-6)
  np.testing.assert_array_equal(m.mask[..., 0], mask)
  assert m.dtype == np.uint8 and m.value_range == (0.0, 255.0)

  train_batch = next(iter(data.train_dataset(config, data.make_source(config, "train"))))
  assert "x" not in train_batch  # the reference never reaches training
  evals = data.eval_batches(config)
  np.testing.assert_allclose(np.concatenate([b["x"] for b in evals]), clean / 127.5 - 1,
                             atol=1e-6)
  np.testing.assert_array_equal(np.concatenate([b["index"] for b in evals]), np.arange(6))
  # Held out: with max_train_examples, evaluation takes the measurements after them.
  config.data.max_train_examples = 4
  assert [b["y"].shape[0] for b in data.eval_batches(config)] == [2]
  np.testing.assert_allclose(data.eval_batches(config)[0]["y"], m.y[4:], atol=1e-6)


def test_value_rule_by_dtype_and_stated_range(tmp_path):
  u16 = np.array([0, 65535, 32768], np.uint16)
  assert measurements.value_range_for(u16.dtype, None, "f") == (0.0, 65535.0)
  np.testing.assert_allclose(measurements.to_model_units(u16, (0.0, 65535.0)),
                             [-1, 1, 32768 / 65535 * 2 - 1], atol=1e-6)
  assert measurements.value_range_for(np.float32, None, "f") == (0.0, 1.0)
  assert measurements.value_range_for(np.int32, (0, 4095), "f") == (0.0, 4095.0)
  with pytest.raises(DataError, match="dtype int32 have no default range"):
    measurements.value_range_for(np.int32, None, "f")
  v = np.array([-1.0, 0.0, 1.0, 1.7])
  np.testing.assert_allclose(measurements.from_model_units(v, (0.0, 4095.0), np.float32),
                             [0, 2047.5, 4095, 1.35 * 4095], rtol=1e-6)
  np.testing.assert_array_equal(measurements.from_model_units(v, (0.0, 255.0), np.uint8),
                                [0, 128, 255, 255])  # rounded, clipped to the dtype
  # A 12-bit camera in uint16 with a stated range, as 16-bit TIFFs.
  import tifffile

  os.makedirs(tmp_path / "t")
  raw = np.random.default_rng(0).integers(0, 4096, (3, 4, 4, 3)).astype(np.uint16)
  for i in range(3):
    tifffile.imwrite(str(tmp_path / "t" / f"{i}.tif"), raw[i])
  config = _config("folder", tmp_path / "t", op="denoise", value_range=(0, 4095))
  np.testing.assert_allclose(measurements.load(config).y, raw / 4095 * 2 - 1, atol=1e-6)


def test_per_example_masks_reach_the_operator(tmp_path):
  n, size = 8, 8
  y = np.random.default_rng(0).uniform(0, 1, (n, size, size, 1)).astype(np.float32)
  mask = _masks(n, size, seed=3)
  np.savez(tmp_path / "m.npz", y=y, mask=mask)
  config = _config("npz", tmp_path / "m.npz", batch=8)
  op = operators.make_operator(config.operator)
  batch = data.prepare_batch(data.eval_batches(config)[0], op, 0, keep_clean=True)
  ones = np.ones((n, size, size, 1), np.float32)
  np.testing.assert_array_equal(op.apply(ones, batch["omega"])[..., 0], mask)
  cond = flow_lib.conditioning_input(op, batch["y"], batch["omega"])  # what the flow sees
  np.testing.assert_array_equal(cond[..., -1], mask)
  # Only observed pixels count in the data term: changing missing ones changes nothing.
  x = np.asarray(batch["y"])
  moved = (x + 5.0 * (1.0 - mask[..., None])).astype(np.float32)
  np.testing.assert_allclose(operators.residual_ratio(op, batch["y"], batch["omega"], moved),
                             np.zeros(n), atol=1e-10)
  np.testing.assert_allclose(operators.measured_dims(x.shape, batch["omega"]),
                             mask.sum(axis=(1, 2)))


# ---------------------------------------------------------------------------
# Ground-truth-free metrics on a case with a known answer.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("op_name", ["denoise", "inpaint_random"])
def test_residual_ratio_is_one_for_the_exact_posterior(op_name):
  """x ~ N(mu, s²) per pixel, y = A x + σ ε: exact posterior samples give 1 on average,
  the posterior mean σ²/(s² + σ²) on observed pixels, y itself 0 and the prior mean
  (s² + σ²)/σ²."""
  rng = np.random.default_rng(0)
  s, sigma, mu, shape = 0.5, 0.2, 0.1, (64, 16, 16, 1)
  op = operators.make_operator({"name": op_name, "sigma_y": sigma})
  omega = {} if op_name == "denoise" else {
      "mask": (rng.random(shape) > 0.5).astype(np.float32)}
  x = mu + s * rng.standard_normal(shape)
  y = np.asarray(op.measure(jax.random.key(1), x.astype(np.float32), omega))
  k = s ** 2 / (s ** 2 + sigma ** 2)
  observed = omega.get("mask", 1.0)
  post_mean = np.where(observed > 0, mu + k * (y - mu), mu)
  post_std = np.where(observed > 0, np.sqrt(k) * sigma, s)
  samples = post_mean + post_std * rng.standard_normal((8,) + shape)

  def ratio(v):
    return float(np.mean(operators.residual_ratio(op, y, omega, v.astype(np.float32))))

  assert abs(ratio(samples) - 1.0) < 0.02
  assert abs(ratio(post_mean) - sigma ** 2 / (s ** 2 + sigma ** 2)) < 0.01
  assert ratio(y) < 1e-10
  assert abs(ratio(np.full(shape, mu)) - (s ** 2 + sigma ** 2) / sigma ** 2) < 0.2
  # Per sample: [S, B] for [S, B, H, W, C].
  assert operators.residual_ratio(op, y, omega, samples.astype(np.float32)).shape == (8, 64)


def test_sigma_y_estimate_on_known_noise_with_and_without_masks(tmp_path):
  rng = np.random.default_rng(0)
  n, size, sigma = 32, 32, 0.1
  t = np.linspace(0, 1, size)
  smooth = 0.6 * np.sin(3 * t[:, None] + rng.uniform(0, 6, (n, 1, 1))) * np.cos(2 * t[None, :])
  y = (smooth[..., None] + sigma * rng.standard_normal((n, size, size, 1))).astype(np.float32)
  est, blocks = measurements.estimate_sigma_y(y)
  assert abs(est / sigma - 1) < 0.05 and blocks == n * 16 * 16
  mask = (rng.random((n, size, size, 1)) > 0.4).astype(np.float32)  # 40 % missing
  est_masked, blocks_masked = measurements.estimate_sigma_y(y * mask, mask)
  assert abs(est_masked / sigma - 1) < 0.1 and 0 < blocks_masked < blocks

  # Requested in the config: used, logged and written to the workdir.
  np.savez(tmp_path / "m.npz", y=(y + 1) / 2)  # floats in (0, 1): σ on [-1, 1] is the same
  config = _config("npz", tmp_path / "m.npz", op="denoise", estimate_sigma_y=True)
  config.operator.sigma_y = 0.5
  resolved, report = data.resolve_config(config)
  assert config.operator.sigma_y == 0.5  # the given config is read, not rewritten
  config = resolved
  assert config.operator.sigma_y == pytest.approx(est, rel=1e-5)
  assert report["sigma_y_used"] == config.operator.sigma_y and report["sigma_y_configured"] == 0.5
  assert (config.data.image_size, config.data.channels) == (32, 1)
  # Not well defined: almost every 2x2 block has a missing pixel.
  sparse = (rng.random((n, size, size)) > 0.97)
  np.savez(tmp_path / "sparse.npz", y=(y[..., 0] + 1) / 2 * sparse, mask=sparse)
  config = _config("npz", tmp_path / "sparse.npz", estimate_sigma_y=True)
  with pytest.raises(DataError, match="σ_y cannot be estimated"):
    data.resolve_config(config)


# ---------------------------------------------------------------------------
# Every bad input gives its message, naming the file or field.
# ---------------------------------------------------------------------------


def _error(config):
  with pytest.raises(DataError) as err:
    data.resolve_config(config)
  return str(err.value)


def test_error_mask_shape_differs_from_image(tmp_path):
  _folder(tmp_path, n=2, size=8, masks=False)
  _save_png(str(tmp_path / "mask" / "img_0.png"), np.full((6, 8), 255, np.uint8))
  message = _error(_config("folder", tmp_path / "y", mask_dir=str(tmp_path / "mask")))
  assert "mask" in message and "img_0.png is 6x8" in message and "is 8x8" in message
  np.savez(tmp_path / "m.npz", y=np.zeros((3, 8, 8)), mask=np.ones((3, 8, 7), bool))
  message = _error(_config("npz", tmp_path / "m.npz"))
  assert "m.npz: array 'mask' has shape (3, 8, 7, 1)" in message and "(3, 8, 8)" in message


def test_error_values_outside_the_stated_range(tmp_path):
  y = np.random.default_rng(0).uniform(0, 255, (4, 8, 8)).astype(np.float32)  # 0..255 floats
  np.savez(tmp_path / "m.npz", y=y)
  message = _error(_config("npz", tmp_path / "m.npz", op="denoise"))
  assert "m.npz: array 'y'" in message and "outside the stated range [0, 1]" in message
  assert "data.value_range" in message
  # The same data with the right range are fine; NaN is not.
  _config_ok = _config("npz", tmp_path / "m.npz", op="denoise", value_range=(0, 255))
  data.resolve_config(_config_ok)
  y[0, 0, 0] = np.nan
  np.savez(tmp_path / "nan.npz", y=y)
  message = _error(_config("npz", tmp_path / "nan.npz", op="denoise", value_range=(0, 255)))
  assert "nan.npz: array 'y'" in message and "NaN" in message


def test_error_mixed_channel_counts_sizes_and_dtypes(tmp_path):
  _save_png(str(tmp_path / "a" / "0.png"), np.zeros((8, 8), np.uint8))
  _save_png(str(tmp_path / "a" / "1.png"), np.zeros((8, 8, 3), np.uint8))
  message = _error(_config("folder", tmp_path / "a", op="denoise"))
  assert "mixed channel counts" in message and "1.png has 3 channels" in message
  _save_png(str(tmp_path / "b" / "0.png"), np.zeros((8, 8), np.uint8))
  _save_png(str(tmp_path / "b" / "1.png"), np.zeros((16, 16), np.uint8))
  assert "mixed image sizes" in _error(_config("folder", tmp_path / "b", op="denoise"))
  _save_png(str(tmp_path / "c" / "0.png"), np.zeros((8, 8), np.uint8))
  _save_png(str(tmp_path / "c" / "1.png"), np.zeros((8, 8), np.uint16))
  assert "mixed dtypes" in _error(_config("folder", tmp_path / "c", op="denoise"))


def test_error_empty_folder_and_missing_paths(tmp_path):
  os.makedirs(tmp_path / "empty")
  message = _error(_config("folder", tmp_path / "empty", op="denoise"))
  assert f"data.path='{tmp_path / 'empty'}'" in message and "no images" in message
  (tmp_path / "notes").mkdir()
  (tmp_path / "notes" / "README.txt").write_text("x")
  assert "1 other entries" in _error(_config("folder", tmp_path / "notes", op="denoise"))
  assert "no such folder" in _error(_config("folder", tmp_path / "nope", op="denoise"))
  assert "no such file" in _error(_config("npz", tmp_path / "nope.npz", op="denoise"))
  np.savez(tmp_path / "zero.npz", y=np.zeros((0, 8, 8)))
  assert "holds no examples" in _error(_config("npz", tmp_path / "zero.npz", op="denoise"))


def test_error_npz_without_y_or_unreadable(tmp_path):
  np.savez(tmp_path / "m.npz", x=np.zeros((2, 8, 8)), mask=np.ones((2, 8, 8)))
  message = _error(_config("npz", tmp_path / "m.npz"))
  assert "has no array 'y' (found: x, mask)" in message
  (tmp_path / "bad.npz").write_bytes(b"not a zip file at all")
  assert "cannot read it as an .npz" in _error(_config("npz", tmp_path / "bad.npz"))
  _folder(tmp_path, n=2, size=8, masks=False)
  (tmp_path / "y" / "img_1.png").write_bytes(b"\x89PNG broken")
  message = _error(_config("folder", tmp_path / "y", op="denoise"))
  assert "Cannot read image" in message and "img_1.png" in message


def test_error_masks_missing_extra_or_not_binary(tmp_path):
  _folder(tmp_path, n=2, size=8, masks=False)
  assert "set data.mask_dir" in _error(_config("folder", tmp_path / "y"))
  os.makedirs(tmp_path / "mask")
  _save_png(str(tmp_path / "mask" / "img_0.png"), np.full((8, 8), 255, np.uint8))
  message = _error(_config("folder", tmp_path / "y", mask_dir=str(tmp_path / "mask")))
  assert "The mask for 'img_1.png' is missing" in message
  _save_png(str(tmp_path / "mask" / "img_1.png"), np.arange(64, dtype=np.uint8).reshape(8, 8))
  message = _error(_config("folder", tmp_path / "y", mask_dir=str(tmp_path / "mask")))
  assert "img_1.png: expected a binary mask" in message
  message = _error(_config("folder", tmp_path / "y", op="denoise",
                           mask_dir=str(tmp_path / "mask")))
  assert "operator.name='denoise' takes no mask" in message
  np.savez(tmp_path / "m.npz", y=np.zeros((2, 8, 8)))
  assert "has no array 'mask'" in _error(_config("npz", tmp_path / "m.npz"))


def test_error_shape_disagrees_with_the_config_or_is_not_square(tmp_path):
  np.savez(tmp_path / "m.npz", y=np.zeros((2, 8, 8, 3)))
  message = _error(_config("npz", tmp_path / "m.npz", op="denoise", image_size=28))
  assert "config.data.image_size=28, but the measurements" in message and "8x8x3" in message
  assert "config.data.channels=1" in _error(_config("npz", tmp_path / "m.npz", op="denoise",
                                                    channels=1))
  np.savez(tmp_path / "wide.npz", y=np.zeros((2, 8, 12)))
  assert "expected square images" in _error(_config("npz", tmp_path / "wide.npz", op="denoise"))
  np.savez(tmp_path / "few.npz", y=np.zeros((3, 8, 8)))
  with pytest.raises(DataError, match="3 measurements for evaluation.*eval.batch_size=4"):
    data.eval_batches(_config("npz", tmp_path / "few.npz", op="denoise"))


def test_error_reference_does_not_match(tmp_path):
  np.savez(tmp_path / "m.npz", y=np.zeros((4, 8, 8)))
  np.savez(tmp_path / "ref.npz", x=np.zeros((3, 8, 8)))
  message = _error(_config("npz", tmp_path / "m.npz", op="denoise",
                           reference_path=str(tmp_path / "ref.npz")))
  assert "ref.npz: array 'x': shape (3, 8, 8, 1); expected (4, 8, 8, 1)" in message


def test_config_checks_for_measurement_files(tmp_path):
  config = measurements_config.get_config()
  with pytest.raises(ConfigError, match=r"config.data.path=None: data.dataset='folder' needs"):
    validate_config(config)
  config.data.path = str(tmp_path)
  validate_config(config)  # the size checks wait for the files (data.resolve_config)
  config.method = "clean"
  with pytest.raises(ConfigError, match="config.method='clean': needs clean training images"):
    validate_config(config)
  config.method = "flowdiff"
  config.data.value_range = (1.0, 0.0)
  with pytest.raises(ConfigError, match="config.data.value_range"):
    validate_config(config)


# ---------------------------------------------------------------------------
# The README's worked example, as written, with fewer steps and smaller networks.
# ---------------------------------------------------------------------------

# Appended to the README's commands so the test fits CI: the same data, config,
# flags and files, a 2-step run of smaller networks (compiling them is most of
# the cost), 2 posterior samples.
_TRAIN_OVERRIDES = (
    "--config.training.num_train_steps=2 --config.training.checkpoint_every_steps=2 "
    "--config.training.sample_every_steps=0 --config.training.batch_size=8 "
    "--config.eval.batch_size=8 --config.data.num_eval_examples=8 "
    "--config.amortized.eval_num_samples=2 --config.model.base_channels=8 "
    "'--config.model.channel_mult=(1,)' --config.flow.num_levels=1 --config.flow.num_steps=1 "
    "--config.flow.hidden_channels=8 --config.flow.cond_channels=4")
_EXPORT_OVERRIDES = "--num_samples=2 --batch_size=64"


def _readme_example():
  text = open(os.path.join(REPO, "README.md")).read()
  blocks = re.findall(r"<!-- tested: tests/test_measurements.py -->\n```bash\n(.*?)```", text,
                      re.S)
  assert len(blocks) == 1
  return blocks[0]


@pytest.mark.slow
def test_readme_example_runs_as_written(tmp_path):
  """Makes the measurements, trains flowdiff on them, exports: the README's commands."""
  os.symlink(os.path.join(REPO, "configs"), tmp_path / "configs")
  script = textwrap.dedent(f"""\
      set -euo pipefail
      run_python() {{
        case "${{2:-}}" in
          flowdiff_jax.main) "{sys.executable}" "$@" {_TRAIN_OVERRIDES} ;;
          flowdiff_jax.export) "{sys.executable}" "$@" {_EXPORT_OVERRIDES} ;;
          *) "{sys.executable}" "$@" ;;
        esac
      }}
      """) + _readme_example().replace(".venv/bin/python", "run_python")
  # One CPU device, as on a user's machine (not the suite's 4 fake ones).
  env = dict(os.environ, PYTHONPATH=REPO, XLA_FLAGS="", JAX_PLATFORMS="cpu")
  with subprocess.Popen(["bash", "-c", script], cwd=tmp_path, env=env, text=True,
                        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                        start_new_session=True) as proc:
    try:
      stdout, stderr = proc.communicate(timeout=600)
    except subprocess.TimeoutExpired:
      os.killpg(proc.pid, signal.SIGKILL)  # bash and the python it runs
      stdout, stderr = proc.communicate()
      pytest.fail(f"The README example did not finish in 600 s; its log ends:\n{stderr[-3000:]}")
  assert proc.returncode == 0, stderr[-3000:]
  assert len(os.listdir(tmp_path / "byom" / "y")) == 256
  # Trained without ground truth: the ground-truth-free metrics, no PSNR.
  assert "eval/residual_ratio=" in stderr and "eval/psnr" not in stderr
  assert "σ_y of byom/y: Haar-MAD estimate" in stderr
  sigma = json.load(open(tmp_path / "workdirs" / "byom" / "sigma_y_estimate.json"))
  assert abs(sigma["sigma_y_estimate"] / 0.1 - 1) < 0.15  # made with σ_y = 0.1
  restored = tmp_path / "workdirs" / "byom" / "restored"
  for name in ("000_mean.png", "000_std.png", "255_mean.png", "restorations.npz", "export.json"):
    assert os.path.exists(restored / name), name
  summary = json.load(open(restored / "export.json"))
  assert summary["num_measurements"] == 256 and np.isfinite(summary["residual_ratio"])
  assert "psnr_posterior_mean" in summary  # the separately supplied clean reference
  assert np.asarray(Image.open(restored / "000_mean.png")).shape == (32, 32)
  assert "residual_ratio=" in stdout
