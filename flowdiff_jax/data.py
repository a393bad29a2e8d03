"""Input pipeline: tfds images read through grain, with fixed per-example corruptions.

What a training step sees is built in two stages:

1. On the host (grain): clean uint8 images with their *dataset index*, shuffled
   anew every epoch, batched, each global batch cut into one contiguous slice
   per JAX process. Elements are `{"image": uint8 [b, H, W, C], "index":
   int32 [b]}` with b the per-process batch; concatenated in process order they
   are the one-process global batch. The iterator's state is a few integers and
   goes into checkpoints.
2. On device (`make_prepare_fn`): images are mapped to [-1, 1] and corrupted
   with `operators.corrupt`, whose noise draw and mask depend only on
   (data.corruption_seed, index). So each training example carries one fixed
   corruption, identical in every epoch, on any device count and after a resume
   (DESIGN 2.5). Methods that must not see clean images get no `"x"` key.

Sources, tried in this order for each dataset:
* Fashion-MNIST: the idx files of the Debian package `dataset-fashion-mnist`
  (`data.fmnist_idx_dir`), fully offline.
* Any dataset: a prepared tfds copy under `data.data_dir`, read with
  `tfds.data_source` (array_record, random access, no TensorFlow needed).
* Otherwise tfds downloads and prepares it; when the download host cannot be
  reached, `DatasetUnavailableError` says so within seconds.
"""

from __future__ import annotations

import dataclasses
import gzip
import os
import socket
import urllib.error
import urllib.request
from typing import Any, Sequence

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from flowdiff_jax import operators


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  """What the pipeline needs to know about a tfds dataset."""
  native_size: int       # side of the square images we use at image_size=0
  channels: int
  eval_split: str        # held-out split used for evaluation
  probe_url: str         # a download URL, probed before tfds starts its retries
  how_to_get: str        # what to tell a user who has no copy of it


DATASETS = {
    "fashion_mnist": DatasetSpec(
        28, 1, "test",
        "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/train-images-idx3-ubyte.gz",
        "install the Debian package `dataset-fashion-mnist` (idx files under "
        "/usr/share/datasets/fashion-mnist) or run `tfds build fashion_mnist` "
        "on a machine with network and copy the data_dir here"),
    "mnist": DatasetSpec(
        28, 1, "test",
        "https://storage.googleapis.com/cvdf-datasets/mnist/train-images-idx3-ubyte.gz",
        "run `tfds build mnist --data_dir=DIR` on a machine with network and "
        "pass --config.data.data_dir=DIR"),
    "cifar10": DatasetSpec(
        32, 3, "test",
        "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz",
        "run `tfds build cifar10 --data_dir=DIR` on a machine with network and "
        "pass --config.data.data_dir=DIR"),
    "celeb_a": DatasetSpec(
        64, 3, "test",
        "https://drive.google.com/uc?export=download&id=0B7EVK8r0v71pZjFTYXZWM3FlRnM",
        "run `tfds build celeb_a --data_dir=DIR` on a machine with network "
        "(Google Drive quotas may require retries) and pass --config.data.data_dir=DIR"),
}

# Fashion-MNIST idx file names, by tfds split.
_IDX_FILES = {"train": "train-images-idx3-ubyte.gz", "test": "t10k-images-idx3-ubyte.gz"}


class DatasetUnavailableError(RuntimeError):
  """The dataset is neither available locally nor downloadable from here."""


def image_shape(config: ml_collections.ConfigDict) -> tuple[int, int, int]:
  """(H, W, C) of the images the models see."""
  spec = DATASETS[config.data.dataset]
  size = config.data.image_size or spec.native_size
  return (size, size, spec.channels)


# --------------------------------------------------------------------------
# Sources: random-access sequences of {"image": uint8 [H, W, C]}.
# --------------------------------------------------------------------------


def read_idx_images(path: str) -> np.ndarray:
  """Reads a (gzipped) idx3 image file into uint8 [N, H, W, 1]."""
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "rb") as f:
    raw = f.read()
  magic, n, h, w = np.frombuffer(raw[:16], dtype=">u4")
  if magic != 2051:
    raise ValueError(f"{path} is not an idx3 image file (magic number {magic}).")
  images = np.frombuffer(raw, dtype=np.uint8, offset=16)
  return images.reshape(n, h, w, 1)


class ArraySource:
  """An in-memory random-access grain source over uint8 images [N, H, W, C]."""

  def __init__(self, images: np.ndarray):
    self._images = images

  def __len__(self) -> int:
    return len(self._images)

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    return {"image": self._images[index]}


class _TfdsImages:
  """Keeps only the image of a tfds data source record (labels are never used)."""

  def __init__(self, source: Sequence[dict[str, Any]]):
    self._source = source

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    return {"image": np.asarray(self._source[index]["image"])}


def _download_reachable(url: str, timeout_s: float = 5.0) -> bool:
  """True when the download host answers at all (any HTTP status counts)."""
  try:
    urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout_s)
  except urllib.error.HTTPError:
    return True  # the host is there; tfds knows how to talk to it
  except (urllib.error.URLError, socket.timeout, OSError):
    return False
  return True


def _tfds_source(name: str, split: str, data_dir: str | None):
  import tensorflow_datasets as tfds  # heavy; only the training program needs it

  builder = tfds.builder(name, data_dir=data_dir, file_format="array_record")
  if not builder.is_prepared():
    spec = DATASETS[name]
    # tfds retries an unreachable host for minutes; a quick probe fails in seconds.
    if not _download_reachable(spec.probe_url):
      looked = [f"tfds data_dir {builder.data_dir!r} (not prepared)"]
      if name == "fashion_mnist":
        looked.insert(0, "idx files in data.fmnist_idx_dir")
      raise DatasetUnavailableError(
          f"Dataset {name!r} is not available: looked in {', '.join(looked)}, "
          f"and its download host ({spec.probe_url}) cannot be reached. "
          f"To provide it: {spec.how_to_get}.")
  return tfds.data_source(name, split=split, data_dir=data_dir, download=True,
                          builder_kwargs={"file_format": "array_record"})


def make_source(config: ml_collections.ConfigDict, split: str):
  """A random-access source of {"image": uint8 [H, W, C]} for `split`."""
  name = config.data.dataset
  idx_dir = config.data.get("fmnist_idx_dir") or ""
  if name == "fashion_mnist" and idx_dir:
    path = os.path.join(idx_dir, _IDX_FILES[split])
    if os.path.exists(path):
      return ArraySource(read_idx_images(path))
  return _TfdsImages(_tfds_source(name, split, config.data.get("data_dir")))


def _resize_fn(config: ml_collections.ConfigDict):
  """Per-example uint8 [h, w, C] -> uint8 [S, S, C]: centre crop to a square, then resize."""
  size = image_shape(config)[0]

  def resize(image: np.ndarray) -> np.ndarray:
    h, w = image.shape[:2]
    if (h, w) == (size, size):
      return image
    from PIL import Image  # only needed when images change size (celeb_a)

    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    image = image[top:top + side, left:left + side]
    pil = Image.fromarray(image.squeeze(-1) if image.shape[-1] == 1 else image)
    pil = pil.resize((size, size), Image.Resampling.BICUBIC if size > side
                     else Image.Resampling.BOX)
    return np.asarray(pil).reshape(size, size, -1)

  return resize


# --------------------------------------------------------------------------
# grain pipelines.
# --------------------------------------------------------------------------


class _Indexed:
  """Adds the record's dataset index, "index": int32, to each element; optionally the first n only.

  The index is attached at the source: it names the example's fixed corruption,
  so it must be the record's own index, never a position in a shuffled or
  repeated view (grain passes those views' positions to downstream maps).
  """

  def __init__(self, source, limit: int = 0):
    self._source = source
    self._len = min(limit, len(source)) if limit else len(source)

  def __len__(self) -> int:
    return self._len

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    if not 0 <= index < self._len:
      raise IndexError(f"index {index} out of range [0, {self._len})")
    return {**self._source[index], "index": np.int32(index)}


def _indexed(source, config, limit: int = 0) -> grain.MapDataset:
  resize = _resize_fn(config)
  return grain.MapDataset.source(_Indexed(source, limit)).map(
      lambda ex: {**ex, "image": resize(ex["image"])})


def _process(process_index: int | None, process_count: int | None) -> tuple[int, int]:
  """(index, count) of this JAX process, unless given (tests simulate processes)."""
  index = jax.process_index() if process_index is None else process_index
  count = jax.process_count() if process_count is None else process_count
  if not 0 <= index < count:
    raise ValueError(f"process_index {index} is not in [0, {count}).")
  return index, count


def _process_batches(ds: grain.MapDataset, batch_size: int, process_index: int,
                     process_count: int) -> grain.MapDataset:
  """Batches of `batch_size` / process_count: this process's contiguous part of each global batch.

  Local batch k of process p holds elements [k*G + p*G/n, k*G + (p+1)*G/n) of
  `ds` (G = batch_size, n = process_count), so the processes' batches,
  concatenated in process order as `jax.make_array_from_process_local_data`
  does, are exactly the single-process global batch: the same examples in the
  same order, whatever the number of hosts.
  """
  if batch_size % process_count:
    raise ValueError(f"Batch size {batch_size} does not divide over {process_count} processes.")
  # Batching before slicing keeps each slice contiguous; the slice is lazy, so
  # a process reads only its own records.
  ds = ds.batch(batch_size // process_count, drop_remainder=True)
  return ds[process_index::process_count]


def train_dataset(config: ml_collections.ConfigDict, source=None, *,
                  process_index: int | None = None,
                  process_count: int | None = None) -> grain.IterDataset:
  """Infinite, per-epoch reshuffled training batches of this JAX process.

  Returns batches `{"image": uint8 [b, H, W, C], "index": int32 [b]}` with
  b = training.batch_size / process_count, this process's contiguous part of
  each global batch (see `_process_batches`). process_index/process_count
  default to jax's.
  """
  process_index, process_count = _process(process_index, process_count)
  source = make_source(config, "train") if source is None else source
  ds = _indexed(source, config, limit=config.data.max_train_examples)
  ds = ds.shuffle(seed=config.data.shuffle_seed).repeat(None)
  ds = _process_batches(ds, config.training.batch_size, process_index, process_count)
  read = grain.ReadOptions(num_threads=config.data.read_threads, prefetch_buffer_size=4)
  return ds.to_iter_dataset(read)


def eval_batches(config: ml_collections.ConfigDict, source=None, *,
                 process_index: int | None = None,
                 process_count: int | None = None) -> list[dict[str, np.ndarray]]:
  """The first data.num_eval_examples held-out images, as this process's batches.

  Only whole global batches of eval.batch_size are used (a ragged last batch
  would not split over the devices), each split over the processes like the
  training batches. process_index/process_count default to jax's.

  Held-out images are corrupted with their own indices (and the same seed):
  they are test data, only ever used for evaluation.
  """
  process_index, process_count = _process(process_index, process_count)
  spec = DATASETS[config.data.dataset]
  source = make_source(config, spec.eval_split) if source is None else source
  batch = config.eval.batch_size
  # Whole global batches only: otherwise processes could get different counts.
  n = min(config.data.num_eval_examples, len(source)) // batch * batch
  if n == 0:
    return []  # (limit=0 below would mean "all")
  ds = _indexed(source, config, limit=n)
  return list(_process_batches(ds, batch, process_index, process_count))


# --------------------------------------------------------------------------
# On-device preparation: scale, corrupt, and keep what the method may see.
# --------------------------------------------------------------------------


def to_model_range(image: jax.Array) -> jax.Array:
  """uint8 [0, 255] -> float32 [-1, 1]."""
  return image.astype(jnp.float32) / 127.5 - 1.0


def to_uint8(x: jax.Array | np.ndarray) -> np.ndarray:
  """float [-1, 1] -> uint8 [0, 255] (clipped)."""
  return np.asarray(np.clip(np.round((np.asarray(x) + 1.0) * 127.5), 0, 255), np.uint8)


def prepare_batch(raw: dict[str, jax.Array], op: operators.Operator, corruption_seed: int,
                  keep_clean: bool) -> dict[str, Any]:
  """Raw batch -> what a train or eval step consumes.

  Args:
    raw: {"image": uint8 [B, H, W, C], "index": int32 [B]}.
    op: the forward operator.
    corruption_seed: data.corruption_seed.
    keep_clean: whether the clean images go into the batch (the `clean` method
      and evaluation); corrupted-data methods never see them.

  Returns:
    {"y": [B, H, W, C], "omega": operator parameters (e.g. {"mask": [B, H, W, 1]}),
     "index": [B]} plus "x": [B, H, W, C] when keep_clean.
  """
  x = to_model_range(raw["image"])
  measured = operators.corrupt(op, x, raw["index"], corruption_seed)
  batch = {"y": measured.pop("y"), "omega": measured, "index": raw["index"]}
  if keep_clean:
    batch["x"] = x
  return batch


def global_batch(local: dict[str, np.ndarray], sharding: jax.sharding.Sharding) -> dict[str, jax.Array]:
  """Assembles each process's batch into global arrays sharded along the batch axis."""
  return jax.tree.map(lambda a: jax.make_array_from_process_local_data(sharding, a), local)


