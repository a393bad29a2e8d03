"""Paths of workdirs, data and outputs: local folders or any filesystem epath reaches.

Every file the project reads or writes goes through `etils.epath` (what orbax,
tfds and grain use), so a workdir or data folder may be a local path or a URI
such as gs://bucket/run (TensorFlow's gfile or fsspec/gcsfs behind epath;
orbax writes its arrays through tensorstore's own GCS driver). Local paths
are made absolute once, here: orbax refuses relative ones, and a later
os.chdir must not move a run.
"""

from __future__ import annotations

import io
import json
import os
from typing import Any

from etils import epath
import numpy as np

PathLike = str | os.PathLike


def is_uri(path: PathLike) -> bool:
  """Whether `path` names a non-local filesystem (gs://..., s3://...)."""
  return "://" in os.fspath(path)


def resolve(path: PathLike) -> epath.Path:
  """`path` as an epath.Path: a local path made absolute, a URI as it is.

  (os.path.abspath of "gs://b/run" would be "<cwd>/gs:/b/run": a local folder.)
  """
  return epath.Path(path) if is_uri(path) else epath.Path(os.path.abspath(path))


def as_str(path: PathLike) -> str:
  """resolve(path) as a string, for APIs that take strings (orbax, clu, logging)."""
  return os.fspath(resolve(path))


def files(folder: PathLike) -> list[epath.Path]:
  """Every file under `folder` (recursively; [] if it is missing), sorted.

  (epath's glob refuses "**" on buckets; this lists folder by folder.)
  """
  folder, found = resolve(folder), []
  if not folder.is_dir():
    return found
  for path in folder.iterdir():
    found.extend(files(path) if path.is_dir() else [path])
  return sorted(found)


def write_bytes(path: PathLike, content: bytes) -> epath.Path:
  """Writes `content` to `path`, making its parent folders; the resolved path.

  The file is complete or absent, never cut short by a kill: locally it is
  written beside and renamed (atomic on POSIX); a bucket's object appears
  only once its upload has finished.
  """
  path = resolve(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  if is_uri(path):
    path.write_bytes(content)
  else:
    partial = path.with_name(path.name + ".partial")
    partial.write_bytes(content)
    os.replace(partial, path)
  return path


def write_text(path: PathLike, text: str) -> epath.Path:
  return write_bytes(path, text.encode())


def write_json(path: PathLike, obj: Any) -> epath.Path:
  """`obj` as indented JSON, NaN written as NaN (as null it would read as missing)."""
  return write_text(path, json.dumps(obj, indent=2) + "\n")


def write_image(path: PathLike, image: np.ndarray) -> epath.Path:
  """An image [H, W, C] in its dtype, in the format of the path's suffix.

  .tif/.tiff through tifffile (any dtype and channel count), anything else
  through Pillow (e.g. .png: uint8 with 1-4 channels, uint16 greyscale).
  """
  image = image[..., 0] if image.shape[-1] == 1 else image
  buffer = io.BytesIO()
  suffix = os.path.splitext(os.fspath(path))[1].lower()
  if suffix in (".tif", ".tiff"):
    import tifffile  # noqa: PLC0415 (only the exporters need it)

    tifffile.imwrite(buffer, image)
  else:
    from PIL import Image  # noqa: PLC0415 (the core does not need Pillow)

    Image.fromarray(image).save(buffer, format=Image.registered_extensions()[suffix])
  return write_bytes(path, buffer.getvalue())


def write_npz(path: PathLike, **arrays: np.ndarray) -> epath.Path:
  buffer = io.BytesIO()
  np.savez(buffer, **arrays)
  return write_bytes(path, buffer.getvalue())


def save_npy(path: PathLike, array: np.ndarray) -> epath.Path:
  buffer = io.BytesIO()
  np.save(buffer, array)
  return write_bytes(path, buffer.getvalue())


def load_npy(path: PathLike) -> np.ndarray:
  return np.load(io.BytesIO(resolve(path).read_bytes()), allow_pickle=False)
