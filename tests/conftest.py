"""Test set-up: four fake CPU devices, set before jax is first imported; shared fixtures."""
import gzip
import os

import numpy as np
import pytest

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# TensorFlow (pulled in by clu/tfds) must never grab a GPU or spam the log.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

# isort: off
import flowdiff_jax  # noqa: F401  (its XLA bug workarounds, before jax starts)
import jax
# isort: on

jax.config.update("jax_threefry_partitionable", True)

# Several tests compile the same tiny programs (e.g. a run and its resume):
# a persistent cache for the session compiles each once.
_CACHE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".pytest_cache", "jax")
jax.config.update("jax_compilation_cache_dir", os.path.abspath(_CACHE))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

def pytest_configure(config):
  config.addinivalue_line(
      "markers", "slow: takes tens of seconds or more (whole training runs, subprocesses, "
      "long compiles); `pytest -m 'not slow'` is the quick inner loop")


# --------------------------------------------------------------------------
# Data fixtures.
# --------------------------------------------------------------------------

# Sizes of the generated Fashion-MNIST splits: enough for every test's
# data.max_train_examples (<= 64) and held-out evaluation (data.num_eval_examples).
FMNIST_FIXTURE_SIZES = {"train": 320, "t10k": 80}


def fake_fashion_mnist_images(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """(uint8 [n, 28, 28], uint8 labels [n]): deterministic Fashion-MNIST look-alikes.

  Each label has its own silhouette (a centred box of a label-dependent size)
  filled with a smooth texture and noise on a black background, so images are
  neither constant nor pure noise, and differ from one another.
  """
  rng = np.random.default_rng(seed)
  labels = (np.arange(n) % 10).astype(np.uint8)
  rng.shuffle(labels)
  rows, cols = np.mgrid[0:28, 0:28]
  images = np.zeros((n, 28, 28), np.uint8)
  for i, label in enumerate(labels):
    half_h = 6 + int(label) % 5 + int(rng.integers(0, 3))
    half_w = 4 + int(label) // 2 + int(rng.integers(0, 3))
    inside = (np.abs(rows - 13.5) <= half_h) & (np.abs(cols - 13.5) <= half_w)
    texture = 120 + 60 * np.sin(rows / (2 + int(label)) + rng.uniform(0, 6)) \
        + rng.normal(0, 20, (28, 28))
    images[i] = np.where(inside, np.clip(texture, 1, 255), 0).astype(np.uint8)
  return images, labels


def write_idx(path: str, array: np.ndarray) -> None:
  """A gzipped idx file of uint8 `array`: idx3 (magic 2051) for images, idx1 (2049) for labels."""
  magic = {3: 2051, 1: 2049}[array.ndim]
  header = np.array([magic, *array.shape], dtype=">u4").tobytes()
  with gzip.open(path, "wb") as f:
    f.write(header + np.ascontiguousarray(array, np.uint8).tobytes())


@pytest.fixture(scope="session")
def fmnist_idx_dir(tmp_path_factory) -> str:
  """A folder of generated Fashion-MNIST idx files, in the Debian package's layout.

  train-/t10k-images-idx3-ubyte.gz and -labels-idx1-ubyte.gz, of
  FMNIST_FIXTURE_SIZES images each, the same on every call. Point a config at
  it with `config.data.fmnist_idx_dir = fmnist_idx_dir` (a subprocess: the
  flag `--config.data.fmnist_idx_dir=...`); the tests then never depend on
  the Debian package dataset-fashion-mnist nor on the network.
  """
  folder = tmp_path_factory.mktemp("fashion-mnist")
  for seed, (split, n) in enumerate(FMNIST_FIXTURE_SIZES.items()):
    images, labels = fake_fashion_mnist_images(n, seed)
    write_idx(str(folder / f"{split}-images-idx3-ubyte.gz"), images)
    write_idx(str(folder / f"{split}-labels-idx1-ubyte.gz"), labels)
  return str(folder)


@pytest.fixture
def mock_fashion_mnist(monkeypatch):
  """tfds mock data in place of Fashion-MNIST (deterministic per index), no network.

  For configs with data.fmnist_idx_dir = "" (the tfds source).
  """
  import tensorflow_datasets as tfds

  from flowdiff_jax import data

  monkeypatch.setattr(data, "_download_reachable", lambda url, timeout_s=5.0: True)
  with tfds.testing.mock_data(num_examples=64):
    yield
