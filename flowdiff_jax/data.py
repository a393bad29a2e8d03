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
   (docs/design.md §2.5). Methods that must not see clean images get no `"x"` key.

Sources, tried in this order for each tfds dataset:
* Fashion-MNIST: the idx files of the Debian package `dataset-fashion-mnist`
  (`data.fmnist_idx_dir`), fully offline.
* Any dataset: a prepared tfds copy under `data.data_dir`, read with
  `tfds.data_source` (array_record, random access, no TensorFlow needed).
* Otherwise tfds downloads and prepares it; when the download host cannot be
  reached, `DatasetUnavailableError` says so within seconds.

Measurements in files (`data.dataset` "npz" or "folder", `flowdiff_jax.measurements`)
take the same pipeline with elements `{"y": float32 [H, W, C] (model units),
"mask": float32 [H, W, 1] (masking operators), "index"}`: no clean image and no
corruption draw; the measurement *is* the fixed corruption. `prepare_batch`
passes y through and puts the mask into omega. Evaluation batches also carry
the clean reference "x" when `data.reference_path` gives one.

Data that do not fit the config (wrong shape, dtype or range, an empty split,
an unreadable file) raise `DataError`, naming the file or field and what was
expected.
"""

from __future__ import annotations

from collections.abc import Sequence
import copy
import dataclasses
import gzip
import os
from typing import Any
import urllib.error
import urllib.request

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from flowdiff_jax import measurements, operators
from flowdiff_jax.measurements import DataError


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


def is_measured(config: ml_collections.ConfigDict) -> bool:
  """Whether the data are measurements read from files (no clean images, no corruption draw)."""
  return config.data.dataset in measurements.KINDS


def image_shape(config: ml_collections.ConfigDict) -> tuple[int, int, int]:
  """(H, W, C) of the images the models see."""
  if is_measured(config):
    return measurements.image_shape(config)
  spec = DATASETS[config.data.dataset]
  size = config.data.image_size or spec.native_size
  return (size, size, spec.channels)


# --------------------------------------------------------------------------
# Sources: random-access sequences of {"image": uint8 [H, W, C]}.
# --------------------------------------------------------------------------


def read_idx_images(path: str) -> np.ndarray:
  """Reads a (gzipped) idx3 image file into uint8 [N, H, W, 1]; DataError if it is not one."""
  opener = gzip.open if path.endswith(".gz") else open
  try:
    with opener(path, "rb") as f:
      raw = f.read()
  except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError
    raise DataError(f"Cannot read {path}: {type(e).__name__}: {e}; the file is damaged (expected "
                    "a gzipped idx3 image file).") from e
  if len(raw) < 16:
    raise DataError(f"{path} is not an idx3 image file: {len(raw)} bytes, shorter than its "
                    "16-byte header.")
  magic, n, h, w = (int(v) for v in np.frombuffer(raw[:16], dtype=">u4"))
  if magic != 2051:
    raise DataError(f"{path} is not an idx3 image file (magic number {magic}; expected 2051: "
                    "unsigned bytes, 3 dimensions).")
  if n == 0:
    raise DataError(f"{path} holds no images (its header says 0); expected N >= 1.")
  if len(raw) - 16 != n * h * w:
    raise DataError(f"{path} is truncated or damaged: its header says {n} images of {h}x{w} "
                    f"({n * h * w} bytes), the file has {len(raw) - 16} bytes of pixels.")
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
  """Keeps only the image of a tfds data source record (labels are never used).

  Each record is checked: uint8 [H, W, C] with the dataset's channel count,
  and the native size where images are not resized. A damaged record (or a
  wrong one) raises DataError naming the dataset, split, record and place.
  """

  def __init__(self, source: Sequence[dict[str, Any]], name: str = "", split: str = "",
               where: str = ""):
    self._source = source
    self._what = f"record {{}} of {name!r} split {split!r} in {where or 'its data_dir'}"
    self._spec = DATASETS.get(name)
    self._resized = name == "celeb_a"  # the one dataset whose images are cropped and resized

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    what = self._what.format(index)
    try:
      image = np.asarray(self._source[index]["image"])
    except Exception as e:  # array_record/tfds raise many types for damaged files
      raise DataError(f"Cannot read {what}: {type(e).__name__}: {e}; the prepared files may be "
                      "damaged: delete that dataset folder and prepare it again.") from e
    if self._spec is not None:
      check_image(image, what, self._spec, self._resized)
    return {"image": image}


def check_image(image: np.ndarray, what: str, spec: DatasetSpec, resized: bool = False) -> None:
  """DataError unless `image` is uint8 [H, W, spec.channels] (of the native size unless resized)."""
  if image.dtype != np.uint8:
    raise DataError(f"{what}: image dtype {image.dtype}; expected uint8 (0..255).")
  side = spec.native_size
  expected = f"[H, W, {spec.channels}]" if resized else f"[{side}, {side}, {spec.channels}]"
  if image.ndim != 3 or image.shape[-1] != spec.channels or (
      not resized and image.shape[:2] != (side, side)):
    raise DataError(f"{what}: image shape {image.shape}; expected {expected}.")


def _download_reachable(url: str, timeout_s: float = 5.0) -> bool:
  """True when the download host answers at all (any HTTP status counts)."""
  try:
    urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout_s)
  except urllib.error.HTTPError:
    return True  # the host is there; tfds knows how to talk to it
  except (TimeoutError, urllib.error.URLError, OSError):
    return False
  return True


def _tfds_source(name: str, split: str, data_dir: str | None, idx_dir: str = ""):
  import tensorflow_datasets as tfds  # noqa: PLC0415 (heavy; only the training program needs it)

  builder = tfds.builder(name, data_dir=data_dir, file_format="array_record")
  if not builder.is_prepared():
    spec = DATASETS[name]
    # tfds retries an unreachable host for minutes; a quick probe fails in seconds.
    if not _download_reachable(spec.probe_url):
      looked = [f"tfds data_dir {builder.data_dir!r} (not prepared)"]
      if name == "fashion_mnist":
        idx = os.path.join(idx_dir, _IDX_FILES[split])
        looked.insert(0, f"the idx file {idx} (data.fmnist_idx_dir; not there)" if idx_dir
                      else "no idx file (data.fmnist_idx_dir is empty)")
      raise DatasetUnavailableError(
          f"Dataset {name!r} is not available: looked in {', '.join(looked)}, "
          f"and its download host ({spec.probe_url}) cannot be reached. "
          f"To provide it: {spec.how_to_get}.")
  try:
    source = tfds.data_source(name, split=split, data_dir=data_dir, download=True,
                              builder_kwargs={"file_format": "array_record"})
  except Exception as e:  # tfds raises many types for damaged or partial copies
    raise DataError(f"Cannot open split {split!r} of {name!r} in tfds data_dir "
                    f"{builder.data_dir!r}: {type(e).__name__}: {e}. The prepared files may be "
                    "damaged or incomplete: delete that folder and prepare it again.") from e
  if len(source) == 0:
    raise DataError(f"Split {split!r} of {name!r} in tfds data_dir {builder.data_dir!r} is "
                    "empty; expected at least one example.")
  return source, builder.data_dir


def make_source(config: ml_collections.ConfigDict, split: str):
  """A random-access source for `split`.

  tfds datasets give {"image": uint8 [H, W, C]}; measurement files
  (`is_measured`) give {"y", "mask"} and, for evaluation, the reference "x"
  (see `measurements.make_source`).
  """
  if is_measured(config):
    return measurements.make_source(config, split)
  name = config.data.dataset
  idx_dir = config.data.get("fmnist_idx_dir") or ""
  if name == "fashion_mnist" and idx_dir:
    path = os.path.join(idx_dir, _IDX_FILES[split])
    if os.path.exists(path):
      images = read_idx_images(path)
      check_image(images[0], f"{path} (images)", DATASETS[name])
      return ArraySource(images)
  source, where = _tfds_source(name, split, config.data.get("data_dir"), idx_dir)
  return _TfdsImages(source, name, split, where)


def _resize_fn(config: ml_collections.ConfigDict):
  """Per-example uint8 [h, w, C] -> uint8 [S, S, C]: centre crop to a square, then resize."""
  size = image_shape(config)[0]

  def resize(image: np.ndarray) -> np.ndarray:
    h, w = image.shape[:2]
    if (h, w) == (size, size):
      return image
    from PIL import Image  # noqa: PLC0415 (only needed when images change size: celeb_a)

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
  ds = grain.MapDataset.source(_Indexed(source, limit))
  if is_measured(config):
    return ds  # measurements are never resized (it would change their noise and operator)
  resize = _resize_fn(config)
  return ds.map(lambda ex: {**ex, "image": resize(ex["image"])})


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
  if source is None:
    split = "eval" if is_measured(config) else DATASETS[config.data.dataset].eval_split
    source = make_source(config, split)
  batch = config.eval.batch_size
  # Whole global batches only: otherwise processes could get different counts.
  n = min(config.data.num_eval_examples, len(source)) // batch * batch
  if n == 0 and is_measured(config):
    raise DataError(
        f"data.path={config.data.path!r}: {len(source)} measurements for evaluation "
        f"(see measurements.eval_range), fewer than eval.batch_size={batch}; lower "
        "eval.batch_size (a multiple of the device count).")
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
    raw: {"image": uint8 [B, H, W, C], "index": int32 [B]} (clean images, to
      corrupt here), or measurements {"y": float32 [B, H, W, C], "index": [B]}
      with "mask": [B, H, W, 1] for masking operators and, in evaluation
      batches with a reference set, "x": [B, H, W, C].
    op: the forward operator.
    corruption_seed: data.corruption_seed (unused for measurements).
    keep_clean: whether the clean images go into the batch (the `clean` method
      and evaluation); corrupted-data methods never see them. Measurements
      have "x" only where a reference set was given.

  Returns:
    {"y": [B, H, W, C], "omega": operator parameters (e.g. {"mask": [B, H, W, 1]}),
     "index": [B]} plus "x": [B, H, W, C] when keep_clean (and there is one).
  """
  if "y" in raw:
    omega = {"mask": jnp.asarray(raw["mask"], jnp.float32)} if "mask" in raw else {}
    batch = {"y": jnp.asarray(raw["y"], jnp.float32), "omega": omega, "index": raw["index"]}
    if keep_clean and "x" in raw:
      batch["x"] = jnp.asarray(raw["x"], jnp.float32)
    return batch
  x = to_model_range(raw["image"])
  measured = operators.corrupt(op, x, raw["index"], corruption_seed)
  batch = {"y": measured.pop("y"), "omega": measured, "index": raw["index"]}
  if keep_clean:
    batch["x"] = x
  return batch


def global_batch(local: dict[str, np.ndarray],
                 sharding: jax.sharding.Sharding) -> dict[str, jax.Array]:
  """Assembles each process's batch into global arrays sharded along the batch axis."""
  return jax.tree.map(lambda a: jax.make_array_from_process_local_data(sharding, a), local)




def resolve_config(config: ml_collections.ConfigDict
                   ) -> tuple[ml_collections.ConfigDict, dict[str, Any] | None]:
  """What measurement files decide, filled into a copy of `config` (tfds data: an unchanged copy).

  For `data.dataset` "npz"/"folder": reads and checks every file (DataError
  names the file), sets `data.image_size` and `data.channels` from them (or
  checks that set values match), and estimates σ_y with
  `measurements.estimate_sigma_y`; the estimate replaces `operator.sigma_y`
  when `data.estimate_sigma_y` is true. The resolved config is the one saved
  in checkpoints, so a finished run's loader and the export need no files to
  know the shapes and σ_y. `config` itself is not changed.

  Returns:
    (the resolved config, the σ_y report of `measurements.sigma_report` or
    None for tfds data).
  """
  config = copy.deepcopy(config)
  if not is_measured(config):
    return config, None
  m = measurements.load(config)
  h, w, c = m.image_shape
  for field, found in (("image_size", h), ("channels", c)):
    stated = config.data.get(field, 0)
    if stated and stated != found:
      raise DataError(
          f"config.data.{field}={stated}, but the measurements in {config.data.path} have "
          f"{found} ({h}x{w}x{c}); set data.{field}=0 (from the files) or {found}. "
          "Measurements are never resized: that would change their noise and operator.")
  config.data.image_size, config.data.channels = h, c
  configured = float(config.operator.sigma_y)
  use = bool(config.data.get("estimate_sigma_y", False))
  report = measurements.sigma_report(m, configured, use)
  if use and not report["reliable"]:
    raise DataError(
        f"data.estimate_sigma_y=True, but only {report['blocks_used']} fully observed 2x2 "
        f"blocks exist in {config.data.path} (at least {measurements.MIN_SIGMA_BLOCKS} "
        "needed): σ_y cannot be estimated from these data; set operator.sigma_y instead.")
  if use:
    config.operator.sigma_y = report["sigma_y_estimate"]
  return config, report


@dataclasses.dataclass(frozen=True)
class RunData:
  """A run's data, asked once at the start and passed to what needs it.

  Attributes:
    config: the resolved config (`resolve_config`): read, never rewritten.
    image_shape: (H, W, C) of the model's images.
    train_source: the random-access training source (`make_source`), opened once.
    sigma_report: the σ_y estimate of measurement files (None for tfds data).
  """
  config: ml_collections.ConfigDict
  image_shape: tuple[int, int, int]
  train_source: Any
  sigma_report: dict[str, Any] | None = None

  @classmethod
  def open(cls, config: ml_collections.ConfigDict,
           sigma_report: dict[str, Any] | None = None) -> RunData:
    """Opens the training source of a resolved, validated config."""
    return cls(config=config, image_shape=image_shape(config),
               train_source=make_source(config, "train"), sigma_report=sigma_report)

  def train_dataset(self, **process) -> grain.IterDataset:
    """This process's training batches (`train_dataset`); a fresh iterator each call."""
    return train_dataset(self.config, self.train_source, **process)

  def eval_batches(self, **process) -> list[dict[str, np.ndarray]]:
    """This process's held-out batches (`eval_batches`)."""
    return eval_batches(self.config, **process)

  def observations(self, max_examples: int = 0, chunk: int = 4096) -> tuple[jax.Array, dict]:
    """Every training observation (y [N, H, W, C], omega), as the training steps see them.

    Clean images are corrupted with their index and data.corruption_seed,
    exactly as `prepare_batch` does for training; the clean images themselves
    are never returned. max_examples > 0 keeps the first ones. The whole set,
    on every process (for fits made once before training, e.g. gaussian_em).
    """
    n = len(self.train_source)
    n = min(n, max_examples) if max_examples else n
    op = operators.make_operator(self.config.operator)
    seed = self.config.data.corruption_seed
    prepare = jax.jit(lambda raw: prepare_batch(raw, op, seed, keep_clean=False))
    parts = []
    for start in range(0, n, chunk):
      items = [self.train_source[i] for i in range(start, min(start + chunk, n))]
      raw = {k: np.stack([it[k] for it in items]) for k in items[0] if k != "index"}
      raw["index"] = np.arange(start, start + len(items), dtype=np.int32)
      batch = prepare(raw)
      parts.append((batch["y"], batch["omega"]))
    y = jnp.concatenate([p[0] for p in parts])
    omega = jax.tree.map(lambda *a: jnp.concatenate(a), *[p[1] for p in parts])
    return y, omega
