"""Data: idx reading, grain pipeline order/epochs/resume, fixed corruptions, offline errors."""

import gzip
import os
import time

import jax
import numpy as np
import pytest

from flowdiff_jax import data, operators
from flowdiff_jax.configs import tiny


def _images(n, size=28):
  """uint8 [n, size, size, 1] whose pixel (0, 0) and (0, 1) encode the index."""
  images = np.zeros((n, size, size, 1), np.uint8)
  images[:, 0, 0, 0] = np.arange(n) % 256
  images[:, 0, 1, 0] = np.arange(n) // 256
  return images


def _decode(batch_images):
  return batch_images[:, 0, 0, 0].astype(int) + 256 * batch_images[:, 0, 1, 0].astype(int)


def _config(n_train=None, batch=8, op="denoise"):
  config = tiny.get_config()
  config.training.batch_size = batch
  config.operator.name = op
  if n_train:
    config.data.max_train_examples = n_train
  return config


def test_read_idx_round_trip(tmp_path):
  images = np.random.default_rng(0).integers(0, 256, (5, 7, 6), dtype=np.uint8)
  header = np.array([2051, 5, 7, 6], dtype=">u4").tobytes()
  path = str(tmp_path / "x-idx3-ubyte.gz")
  with gzip.open(path, "wb") as f:
    f.write(header + images.tobytes())
  np.testing.assert_array_equal(data.read_idx_images(path), images[..., None])
  bad = str(tmp_path / "bad.gz")
  with gzip.open(bad, "wb") as f:
    f.write(np.array([2049, 5, 7, 6], dtype=">u4").tobytes())
  with pytest.raises(ValueError, match="not an idx3 image file"):
    data.read_idx_images(bad)


def test_fashion_mnist_idx_files_are_used_offline(fmnist_idx_dir, monkeypatch):
  """data.fmnist_idx_dir's idx files are the source: read directly, never tfds or the network."""
  def no_tfds(*args, **kwargs):
    raise AssertionError("tfds must not be asked for data.fmnist_idx_dir's dataset")

  monkeypatch.setattr(data, "_tfds_source", no_tfds)
  config = _config(n_train=24, batch=8)
  config.data.fmnist_idx_dir = fmnist_idx_dir
  for split, prefix in (("train", "train"), ("test", "t10k")):
    source = data.make_source(config, split)
    want = data.read_idx_images(os.path.join(fmnist_idx_dir, f"{prefix}-images-idx3-ubyte.gz"))
    assert len(source) == len(want) >= 64
    np.testing.assert_array_equal(source[5]["image"], want[5])
  image = source[0]["image"]
  assert image.shape == (28, 28, 1) and image.dtype == np.uint8 and 0 < image.mean() < 255
  batch = next(iter(data.train_dataset(config, data.make_source(config, "train"))))
  assert batch["image"].shape == (8, 28, 28, 1) and set(batch["index"].tolist()) <= set(range(24))


_DEBIAN_FMNIST = "/usr/share/datasets/fashion-mnist"


@pytest.mark.skipif(not os.path.exists(os.path.join(_DEBIAN_FMNIST, "t10k-images-idx3-ubyte.gz")),
                    reason="checks the real files of the Debian package dataset-fashion-mnist "
                    "(the generated ones: test_fashion_mnist_idx_files_are_used_offline)")
def test_debian_fashion_mnist_is_used_offline():
  config = tiny.get_config()
  train, test = data.make_source(config, "train"), data.make_source(config, "test")
  assert (len(train), len(test)) == (60_000, 10_000)
  assert train[0]["image"].shape == (28, 28, 1) and train[0]["image"].dtype == np.uint8
  assert 0 < train[0]["image"].mean() < 255


def test_epochs_cover_every_example_once_and_reshuffle():
  n, batch = 32, 8
  config = _config(batch=batch)
  it = iter(data.train_dataset(config, data.ArraySource(_images(n))))
  epochs = [np.concatenate([next(it)["index"] for _ in range(n // batch)]) for _ in range(2)]
  for order in epochs:
    assert sorted(order.tolist()) == list(range(n))
  assert not np.array_equal(epochs[0], epochs[1]), "each epoch must have its own order"


def test_index_names_its_image_and_limit_applies():
  config = _config(n_train=20, batch=4)
  it = iter(data.train_dataset(config, data.ArraySource(_images(300))))
  seen = set()
  for _ in range(10):
    b = next(it)
    np.testing.assert_array_equal(_decode(b["image"]), b["index"])
    seen.update(b["index"].tolist())
  assert seen == set(range(20))


def test_corruption_is_fixed_across_epochs_and_batches():
  """docs/design.md §2.5: an example's noise and mask depend only on its index and the seed."""
  n, batch = 16, 4
  config = _config(batch=batch, op="inpaint_random")
  op = operators.make_operator(config.operator)
  prepare = jax.jit(lambda raw: data.prepare_batch(raw, op, 7, keep_clean=True))
  it = iter(data.train_dataset(config, data.ArraySource(_images(n))))
  by_epoch = []
  for _ in range(2):
    seen = {}
    for _ in range(n // batch):
      out = jax.device_get(prepare(next(it)))
      for i, idx in enumerate(out["index"]):
        seen[int(idx)] = (out["y"][i], out["omega"]["mask"][i])
    by_epoch.append(seen)
  for idx in range(n):
    np.testing.assert_array_equal(by_epoch[0][idx][0], by_epoch[1][idx][0])
    np.testing.assert_array_equal(by_epoch[0][idx][1], by_epoch[1][idx][1])
  # ... and differ between examples (a real draw, not a constant).
  assert not np.array_equal(by_epoch[0][0][1], by_epoch[0][1][1])


def test_prepare_keeps_clean_images_only_when_asked():
  op = operators.make_operator(tiny.get_config().operator)
  raw = {"image": _images(4), "index": np.arange(4, dtype=np.int32)}
  hidden = data.prepare_batch(raw, op, 0, keep_clean=False)
  assert "x" not in hidden and set(hidden) == {"y", "omega", "index"}
  shown = data.prepare_batch(raw, op, 0, keep_clean=True)
  np.testing.assert_allclose(shown["x"], raw["image"] / 127.5 - 1.0, atol=1e-6)
  noise = np.asarray(shown["y"] - shown["x"])
  assert 0.1 < noise.std() < 0.3  # sigma_y = 0.2 on the [-1, 1] scale


def test_iterator_state_resumes_the_same_batches():
  config = _config(batch=4)
  source = data.ArraySource(_images(40))
  it = iter(data.train_dataset(config, source))
  for _ in range(13):  # into the second epoch
    next(it)
  state = it.get_state()
  expected = [next(it)["index"] for _ in range(5)]
  resumed = iter(data.train_dataset(config, source))
  resumed.set_state(state)
  for want in expected:
    np.testing.assert_array_equal(next(resumed)["index"], want)


@pytest.mark.parametrize("num_processes", [2, 4])
def test_process_shards_concatenate_to_the_global_batch(num_processes):
  """Local batches, concatenated in process order, are the 1-process batches, across epochs."""
  n, batch, steps = 20, 8, 7  # 7 batches of 8 cross two epoch boundaries of 20
  config = _config(batch=batch)
  source = data.ArraySource(_images(n))
  single = iter(data.train_dataset(config, source, process_index=0, process_count=1))
  procs = [iter(data.train_dataset(config, source, process_index=p,
                                   process_count=num_processes))
           for p in range(num_processes)]
  for _ in range(steps):
    want = next(single)
    local = [next(it) for it in procs]
    assert all(len(b["index"]) == batch // num_processes for b in local)
    for key in ("index", "image"):
      np.testing.assert_array_equal(np.concatenate([b[key] for b in local]), want[key])


def test_process_shard_resumes_from_its_state():
  config = _config(batch=8)
  source = data.ArraySource(_images(20))
  it = iter(data.train_dataset(config, source, process_index=1, process_count=2))
  for _ in range(4):
    next(it)
  state = it.get_state()
  expected = [next(it)["index"] for _ in range(4)]
  resumed = iter(data.train_dataset(config, source, process_index=1, process_count=2))
  resumed.set_state(state)
  for want in expected:
    np.testing.assert_array_equal(next(resumed)["index"], want)


def test_eval_batches_split_over_processes_like_training():
  config = _config()
  config.data.num_eval_examples = 20  # 2 whole global batches of 8; 4 left over
  config.eval.batch_size = 8
  source = data.ArraySource(_images(50))
  single = data.eval_batches(config, source, process_index=0, process_count=1)
  local = [data.eval_batches(config, source, process_index=p, process_count=4)
           for p in range(4)]
  assert [len(b) for b in local] == [2] * 4  # every process steps through the same count
  for k, want in enumerate(single):
    np.testing.assert_array_equal(np.concatenate([b[k]["index"] for b in local]), want["index"])


def test_process_sharding_rejects_indivisible_batches():
  with pytest.raises(ValueError, match="does not divide over 3 processes"):
    data.train_dataset(_config(batch=8), data.ArraySource(_images(16)),
                       process_index=0, process_count=3)


def test_eval_batches_are_whole_and_fixed():
  config = _config()
  config.data.num_eval_examples = 20
  config.eval.batch_size = 8
  batches = data.eval_batches(config, data.ArraySource(_images(50)))
  assert [len(b["index"]) for b in batches] == [8, 8]
  np.testing.assert_array_equal(np.concatenate([b["index"] for b in batches]), np.arange(16))


def test_resize_centre_crops_and_resizes():
  config = _config()
  config.data.dataset = "celeb_a"
  config.data.image_size = 16
  images = np.zeros((2, 40, 30, 3), np.uint8)
  images[:, 5:35] = 200  # the centre 30x30 square is bright, the rest dark
  ds = data._indexed(data.ArraySource(images), config)
  out = ds[1]["image"]
  assert out.shape == (16, 16, 3) and out.min() == 200


def test_download_probe_fails_fast_on_unreachable_host():
  start = time.time()
  assert not data._download_reachable("http://127.0.0.1:9/never-there", timeout_s=2)
  assert time.time() - start < 5


def test_missing_dataset_error_names_dataset_place_and_remedy(tmp_path, monkeypatch):
  monkeypatch.setattr(data, "_download_reachable", lambda url, timeout_s=5.0: False)
  config = tiny.get_config()
  config.data.dataset = "cifar10"
  config.data.data_dir = str(tmp_path)
  start = time.time()
  with pytest.raises(data.DatasetUnavailableError) as err:
    data.make_source(config, "train")
  assert time.time() - start < 30
  message = str(err.value)
  assert "'cifar10'" in message and str(tmp_path) in message
  assert "tfds build cifar10" in message and "--config.data.data_dir" in message


def test_tfds_mock_data_source(monkeypatch):
  """With a reachable host, tfds' data_source is used (mock_data stands in for the download)."""
  import tensorflow_datasets as tfds

  monkeypatch.setattr(data, "_download_reachable", lambda url, timeout_s=5.0: True)
  config = tiny.get_config()
  config.data.dataset = "cifar10"
  with tfds.testing.mock_data(num_examples=12):
    source = data.make_source(config, "train")
    assert len(source) == 12
    example = source[3]["image"]
  assert example.shape == (32, 32, 3) and example.dtype == np.uint8


# ---------------------------------------------------------------------------
# Bad data: each message names the file or field, what was expected and found.
# ---------------------------------------------------------------------------


def _idx(path, images, n=None):
  n = len(images) if n is None else n
  header = np.array([2051, n, *images.shape[1:3]], dtype=">u4").tobytes()
  with gzip.open(path, "wb") as f:
    f.write(header + images.astype(np.uint8).tobytes())


def test_idx_truncated_damaged_or_empty_file_is_named(tmp_path):
  truncated = str(tmp_path / "truncated.gz")
  _idx(truncated, np.zeros((4, 7, 6)), n=5)
  with pytest.raises(data.DataError, match=r"truncated.gz is truncated or damaged: its header "
                     r"says 5 images of 7x6 \(210 bytes\), the file has 168"):
    data.read_idx_images(truncated)
  damaged = tmp_path / "damaged.gz"
  damaged.write_bytes(b"\x1f\x8b\x08\x00garbage")
  with pytest.raises(data.DataError, match=f"Cannot read {damaged}.*damaged"):
    data.read_idx_images(str(damaged))
  empty = str(tmp_path / "empty.gz")
  _idx(empty, np.zeros((0, 7, 6)))
  with pytest.raises(data.DataError, match="empty.gz holds no images"):
    data.read_idx_images(empty)
  short = tmp_path / "short"
  short.write_bytes(b"\x00\x00\x08")
  with pytest.raises(data.DataError, match="shorter than its 16-byte header"):
    data.read_idx_images(str(short))


def test_idx_images_of_the_wrong_shape_name_the_file(tmp_path):
  _idx(str(tmp_path / "train-images-idx3-ubyte.gz"), np.zeros((3, 32, 32)))
  config = tiny.get_config()
  config.data.fmnist_idx_dir = str(tmp_path)
  with pytest.raises(data.DataError, match=r"train-images-idx3-ubyte.gz \(images\): image shape "
                     r"\(32, 32, 1\); expected \[28, 28, 1\]"):
    data.make_source(config, "train")


def test_missing_local_fashion_mnist_names_the_idx_file(tmp_path, monkeypatch):
  monkeypatch.setattr(data, "_download_reachable", lambda url, timeout_s=5.0: False)
  config = tiny.get_config()
  config.data.fmnist_idx_dir = str(tmp_path / "idx")
  config.data.data_dir = str(tmp_path / "tfds")
  with pytest.raises(data.DatasetUnavailableError) as err:
    data.make_source(config, "test")
  message = str(err.value)
  assert f"the idx file {tmp_path / 'idx' / 't10k-images-idx3-ubyte.gz'}" in message
  assert str(tmp_path / "tfds") in message and "dataset-fashion-mnist" in message


@pytest.mark.parametrize("image, found, expected", [
    (np.zeros((32, 32, 3), np.float32), "image dtype float32", "expected uint8"),
    (np.zeros((28, 28, 3), np.uint8), r"image shape \(28, 28, 3\)", r"expected \[32, 32, 3\]"),
    (np.zeros((32, 32, 1), np.uint8), r"image shape \(32, 32, 1\)", r"expected \[32, 32, 3\]"),
])
def test_tfds_record_of_wrong_dtype_or_shape_is_named(image, found, expected):
  records = [{"image": np.zeros((32, 32, 3), np.uint8)}, {"image": image}]
  source = data._TfdsImages(records, "cifar10", "train", "/data/tfds/cifar10/3.0.2")
  assert source[0]["image"].shape == (32, 32, 3)
  with pytest.raises(data.DataError, match=f"record 1 of 'cifar10' split 'train' in "
                     f"/data/tfds/cifar10/3.0.2: {found}; {expected}"):
    source[1]


def test_tfds_damaged_record_is_named():
  class Damaged:
    def __len__(self):
      return 4

    def __getitem__(self, index):
      raise RuntimeError("array_record: corrupted chunk")

  source = data._TfdsImages(Damaged(), "mnist", "test", "/data/tfds/mnist/3.0.1")
  with pytest.raises(data.DataError, match=r"Cannot read record 2 of 'mnist' split 'test' in "
                     r"/data/tfds/mnist/3.0.1: RuntimeError: array_record: corrupted chunk"):
    source[2]


def test_tfds_empty_split_or_unopenable_files_name_the_place(tmp_path, monkeypatch):
  import tensorflow_datasets as tfds

  monkeypatch.setattr(data, "_download_reachable", lambda url, timeout_s=5.0: True)
  config = tiny.get_config()
  config.data.dataset = "cifar10"
  config.data.data_dir = str(tmp_path)
  monkeypatch.setattr(tfds, "data_source", lambda *args, **kwargs: [])
  with pytest.raises(data.DataError, match=f"Split 'train' of 'cifar10' in tfds data_dir "
                     f"'{tmp_path}.*' is empty"):
    data.make_source(config, "train")

  def damaged(*args, **kwargs):
    raise OSError("unexpected end of array_record file")

  monkeypatch.setattr(tfds, "data_source", damaged)
  with pytest.raises(data.DataError, match=f"Cannot open split 'test' of 'cifar10' in tfds "
                     f"data_dir '{tmp_path}.*OSError: unexpected end"):
    data.make_source(config, "test")
