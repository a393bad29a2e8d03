"""Measurements stored in files: the "bring your own data" source (no clean images anywhere).

Two kinds (`config.data.dataset`), both read whole into memory once, at start,
so that every file is checked before anything compiles:

* ``"npz"``: `data.path` is one ``.npz`` file holding
    - ``y``: the measurements, ``[N, H, W]`` or ``[N, H, W, C]``;
    - ``mask`` (masking operators ``inpaint_random``/``inpaint_box`` only, then
      required): ``[N, H, W]`` or ``[N, H, W, 1]``, binary, 1 = observed.
* ``"folder"``: `data.path` is a folder of images (``.png``, ``.jpg``/``.jpeg``,
  ``.tif``/``.tiff``; other files and sub-folders are ignored), in sorted file
  name order; masking operators also need `data.mask_dir`, a folder holding one
  mask per image under the image's file name (or the same stem with another
  image suffix). Masks are binary images, 0 = missing and 1 or the dtype's
  maximum (255, 65535) = observed; colour masks must have equal channels.

Shapes: every measurement must have the same square size H = W and the same
channel count C; the config's `data.image_size` / `data.channels` are either 0
(taken from the files) or must match them. Measurements are never resized or
cropped: that would change their noise statistics and their operator.

Value rule (the file's units -> the model's [-1, 1]): v -> 2 (v - lo) / (hi - lo) - 1
with (lo, hi) = `data.value_range` when set, else by dtype: uint8 (0, 255),
uint16 (0, 65535), floats (0, 1); any other dtype needs `data.value_range`.
(lo, hi) is the range of the *clean* signal; noisy measurements may leave it,
so observed values must lie in [-1 - m, 1 + m] after mapping, m =
`data.value_margin`. NaN, inf, or values beyond that margin are an error (they
mean the stated range is wrong, e.g. 0..255 floats read as 0..1). Pixels a mask
marks missing are set to 0 and never checked: what a file holds there is no
measurement. Note that 8-bit files clip noisy values at 0 and 255, which biases
the noise model on very dark and very bright pixels; float files do not.

`operator.sigma_y` is stated on the [-1, 1] scale, like everywhere in this
project: σ_y = 0.1 is 0.05 of the range (hi - lo), 12.75 grey levels of uint8.
`estimate_sigma_y` estimates it from the measurements themselves (see there).

An optional clean reference set (`data.reference_path`, evaluation only) is an
``.npz`` with ``x`` in the same order and shape as ``y``, or a folder holding
an image for each measurement under the same file name; it follows the same
value rule.

This module depends on numpy and pillow only (tifffile for TIFF); the grain
pipeline and the JAX side are in `flowdiff_jax.data`.
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses
import functools
import io
import os
from typing import Any
import zipfile

from etils import epath
import numpy as np

KINDS = ("npz", "folder")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
# Operators whose per-example parameters are omega = {"mask": [H, W, 1]}
# (operators.RandomInpaint, operators.BoxInpaint): with measured data the mask
# comes from the files, so drop_prob and box_size are unused.
MASK_OPERATORS = ("inpaint_random", "inpaint_box")
# Default (lo, hi) of the value rule, by dtype kind; other dtypes need data.value_range.
_DEFAULT_RANGES = {np.dtype(np.uint8): (0.0, 255.0), np.dtype(np.uint16): (0.0, 65535.0)}
_FLOAT_RANGE = (0.0, 1.0)
# Fewest fully observed 2x2 blocks for a σ_y estimate we would report.
MIN_SIGMA_BLOCKS = 64


class DataError(ValueError):
  """Data on disk that the config cannot use: wrong shape, dtype or range, empty, unreadable."""


@dataclasses.dataclass(frozen=True)
class Measurements:
  """A measurement set in model units, with what is needed to write results back.

  Attributes:
    y: float32 [N, H, W, C], the measurements mapped to the model's scale (the
      clean signal's range is [-1, 1]); 0 where the mask is 0.
    mask: float32 [N, H, W, 1] (1 = observed), or None for operators without one.
    names: N names: the image file names (folder) or "y[i]" (npz).
    dtype: the stored dtype of the measurements.
    value_range: the (lo, hi) of the file's units that maps to [-1, 1].
    path: the .npz file or the folder.
    x: the clean reference, float32 [N, H, W, C] in model units, or None.
  """
  y: np.ndarray
  mask: np.ndarray | None
  names: tuple[str, ...]
  dtype: np.dtype
  value_range: tuple[float, float]
  path: str
  x: np.ndarray | None = None

  def __len__(self) -> int:
    return len(self.y)

  @property
  def image_shape(self) -> tuple[int, int, int]:
    return tuple(self.y.shape[1:])


# --------------------------------------------------------------------------
# The value rule.
# --------------------------------------------------------------------------


def value_range_for(dtype: np.dtype, configured: Sequence[float] | None,
                    where: str) -> tuple[float, float]:
  """(lo, hi) of the file's units that map to [-1, 1]: `data.value_range`, else by dtype."""
  dtype = np.dtype(dtype)
  if configured is not None:
    lo, hi = (float(v) for v in configured)
    return lo, hi
  if dtype in _DEFAULT_RANGES:
    return _DEFAULT_RANGES[dtype]
  if np.issubdtype(dtype, np.floating):
    return _FLOAT_RANGE
  raise DataError(f"{where}: values of dtype {dtype} have no default range (uint8: 0..255, "
                  "uint16: 0..65535, floats: 0..1); set data.value_range=(lo, hi) to the "
                  "clean signal's range in the file's units.")


def to_model_units(values: np.ndarray, value_range: tuple[float, float]) -> np.ndarray:
  """File units -> float32 model units: lo -> -1, hi -> +1 (linear)."""
  lo, hi = value_range
  return (2.0 * (np.asarray(values, np.float64) - lo) / (hi - lo) - 1.0).astype(np.float32)


def from_model_units(values: np.ndarray, value_range: tuple[float, float],
                     dtype: np.dtype) -> np.ndarray:
  """Model units -> the file's units and dtype (integers rounded and clipped to the dtype)."""
  lo, hi = value_range
  out = (np.asarray(values, np.float64) + 1.0) / 2.0 * (hi - lo) + lo
  dtype = np.dtype(dtype)
  if np.issubdtype(dtype, np.integer):
    info = np.iinfo(dtype)
    return np.clip(np.round(out), info.min, info.max).astype(dtype)
  return out.astype(np.float32 if dtype.itemsize <= 4 else dtype)


def _check_values(values: np.ndarray, mask: np.ndarray | None, value_range, margin: float,
                  where: str, default_range: bool) -> None:
  """Observed model-unit values must be finite and within [-1 - margin, 1 + margin]."""
  observed = values if mask is None else values[np.broadcast_to(mask > 0, values.shape)]
  if observed.size == 0:
    return
  if not np.all(np.isfinite(observed)):
    raise DataError(f"{where}: holds NaN or infinite values; expected finite numbers.")
  vmin, vmax = float(observed.min()), float(observed.max())
  if vmin < -1.0 - margin or vmax > 1.0 + margin:
    lo, hi = value_range
    spread = (hi - lo) / 2.0 * margin
    found = from_model_units(np.array([vmin, vmax]), value_range, np.float64)
    stated = ("the default range of its dtype" if default_range else "data.value_range")
    raise DataError(
        f"{where}: values span [{found[0]:.6g}, {found[1]:.6g}] (file units), outside the "
        f"stated range [{lo:.6g}, {hi:.6g}] ({stated}) widened by data.value_margin={margin} "
        f"of its half-width for noise, i.e. [{lo - spread:.6g}, {hi + spread:.6g}]. Set "
        "data.value_range=(lo, hi) to the clean signal's range in the file's units (or "
        "raise data.value_margin if the noise is that strong).")


def _binary_mask(mask: np.ndarray, where: str) -> np.ndarray:
  """A 0/1 (or 0/dtype-max, or bool) array -> float32 of 0 and 1."""
  if mask.dtype == bool:
    return mask.astype(np.float32)
  values = np.unique(mask)
  top = np.iinfo(mask.dtype).max if np.issubdtype(mask.dtype, np.integer) else 1
  allowed = {0, 1, top}
  if not np.issubdtype(mask.dtype, np.number) or not set(values.tolist()) <= allowed or (
      1 in values and top != 1 and top in values):
    shown = ", ".join(f"{v:g}" for v in values[:6]) + (", ..." if len(values) > 6 else "")
    raise DataError(
        f"{where}: expected a binary mask (0 = missing, 1{f' or {top}' if top != 1 else ''} "
        f"= observed), found {len(values)} distinct values ({shown}) of dtype {mask.dtype}. "
        "(Lossy formats such as JPEG make masks non-binary: store masks as PNG.)")
  return (mask > 0).astype(np.float32)


# --------------------------------------------------------------------------
# Reading files.
# --------------------------------------------------------------------------


def read_image(path: str) -> np.ndarray:
  """One image file -> [H, W, C] in the file's dtype (PNG/JPEG: pillow, TIFF: tifffile)."""
  try:
    content = io.BytesIO(epath.Path(path).read_bytes())  # local or gs://...
    if path.lower().endswith((".tif", ".tiff")):
      import tifffile  # noqa: PLC0415 (only TIFF needs it; scikit-image brings it)
      array = np.asarray(tifffile.imread(content))
    else:
      from PIL import Image  # noqa: PLC0415

      with Image.open(content) as image:
        image.load()
        if image.mode == "P":  # palette: expand to the colours it stands for
          image = image.convert("RGBA" if "transparency" in image.info else "RGB")
        array = np.asarray(image)
  except Exception as e:  # pillow and tifffile raise many types for a broken file
    raise DataError(f"Cannot read image {path}: {type(e).__name__}: {e}") from e
  if array.ndim == 2:
    array = array[..., None]
  if array.ndim != 3:
    raise DataError(f"{path}: expected an image of shape [H, W] or [H, W, C], found an array "
                    f"of shape {array.shape}.")
  return array


def _check_npz_shape(array: np.ndarray, where: str) -> np.ndarray:
  if array.ndim == 3:
    array = array[..., None]
  if array.ndim != 4:
    raise DataError(f"{where}: expected shape [N, H, W] or [N, H, W, C], found {array.shape}.")
  if len(array) == 0:
    raise DataError(f"{where}: holds no examples (shape {array.shape}); expected N >= 1.")
  return array


def _check_square(shape: Sequence[int], where: str) -> None:
  if shape[0] != shape[1]:
    raise DataError(f"{where}: the images are {shape[0]}x{shape[1]}; expected square images "
                    "(H = W, the models' data.image_size): crop them to a square first.")


def _open_npz(path: str, field: str):
  if not epath.Path(path).is_file():
    raise DataError(f"{field}={path!r}: no such file; expected an .npz file.")
  try:
    return np.load(io.BytesIO(epath.Path(path).read_bytes()), allow_pickle=False)
  except Exception as e:  # zipfile.BadZipFile, ValueError, OSError, ...
    raise DataError(f"{field}={path!r}: cannot read it as an .npz file "
                    f"({type(e).__name__}: {e}).") from e


def _npz_array(npz, path: str, key: str) -> np.ndarray:
  try:
    return np.asarray(npz[key])
  except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
    raise DataError(f"{path}: array {key!r} cannot be read ({type(e).__name__}: {e}); the "
                    "file may be truncated or hold Python objects (arrays of numbers "
                    "expected).") from e


def _list_images(folder: str, field: str) -> list[str]:
  if not epath.Path(folder).is_dir():
    raise DataError(f"{field}={folder!r}: no such folder; expected a folder of images "
                    f"({', '.join(IMAGE_SUFFIXES)}).")
  entries = sorted(epath.Path(folder).iterdir(), key=lambda p: p.name)
  names = [p.name for p in entries if p.name.lower().endswith(IMAGE_SUFFIXES)
           and not p.name.startswith(".") and p.is_file()]
  if not names:
    others = f" (it holds {len(entries)} other entries)" if entries else " (it is empty)"
    raise DataError(f"{field}={folder!r}: no images ({', '.join(IMAGE_SUFFIXES)}) in this "
                    f"folder{others}.")
  return names


def _matching_file(folder: str, name: str, what: str) -> str:
  """The file in `folder` named `name`, or with `name`'s stem and another image suffix."""
  exact = os.path.join(folder, name)
  if epath.Path(exact).is_file():
    return exact
  stem = os.path.splitext(name)[0]
  for suffix in IMAGE_SUFFIXES:
    for candidate in (stem + suffix, stem + suffix.upper()):
      if epath.Path(folder, candidate).is_file():
        return os.path.join(folder, candidate)
  raise DataError(f"{what} for {name!r} is missing: expected {exact} (or {stem} with another "
                  f"image suffix: {', '.join(IMAGE_SUFFIXES)}).")


def _stack_images(folder: str, names: Sequence[str], field: str) -> tuple[np.ndarray, np.dtype]:
  """Reads images of one shape and dtype into [N, H, W, C]; errors name the odd file out."""
  arrays, first = [], None
  for name in names:
    path = os.path.join(folder, name)
    array = read_image(path)
    if first is None:
      first = (name, array.shape, array.dtype)
    elif array.shape[-1] != first[1][-1]:
      raise DataError(f"{field}: mixed channel counts: {path} has {array.shape[-1]} channels, "
                      f"{first[0]} has {first[1][-1]}; expected one channel count for all.")
    elif array.shape != first[1]:
      raise DataError(f"{field}: mixed image sizes: {path} is {array.shape[0]}x"
                      f"{array.shape[1]}, {first[0]} is {first[1][0]}x{first[1][1]}; expected "
                      "one size for all.")
    elif array.dtype != first[2]:
      raise DataError(f"{field}: mixed dtypes: {path} is {array.dtype}, {first[0]} is "
                      f"{first[2]}; expected one dtype for all (convert them first).")
    arrays.append(array)
  return np.stack(arrays), first[2]


def _mask_from_image(path: str, image_shape: Sequence[int], image_name: str) -> np.ndarray:
  """A mask image -> float32 [H, W, 1]."""
  mask = read_image(path)
  if mask.shape[:2] != tuple(image_shape[:2]):
    raise DataError(f"Mask {path} is {mask.shape[0]}x{mask.shape[1]}, its image {image_name} "
                    f"is {image_shape[0]}x{image_shape[1]}; expected the same size.")
  if mask.shape[-1] > 1:
    if not np.all(mask == mask[..., :1]):
      raise DataError(f"Mask {path} has {mask.shape[-1]} channels that differ; expected one "
                      "mask shared by all channels (greyscale, or equal channels).")
    mask = mask[..., :1]
  return _binary_mask(mask, f"Mask {path}")


# --------------------------------------------------------------------------
# Loading a measurement set.
# --------------------------------------------------------------------------


def _finish(y_raw: np.ndarray, mask: np.ndarray | None, names, dtype, configured_range,
            margin: float, path: str, where: str) -> Measurements:
  value_range = value_range_for(dtype, configured_range, where)
  if not value_range[1] > value_range[0]:
    raise DataError(f"data.value_range={tuple(configured_range)}: expected lo < hi.")
  y = to_model_units(y_raw, value_range)
  if mask is not None:
    y = y * mask  # what a file holds at missing pixels is no measurement
  _check_values(y, mask, value_range, margin, where, default_range=configured_range is None)
  return Measurements(y=y, mask=mask, names=tuple(names), dtype=np.dtype(dtype),
                      value_range=value_range, path=path)


def load_npz(path: str, *, needs_mask: bool, value_range=None, value_margin: float = 1.0,
             operator_name: str = "") -> Measurements:
  """Reads an .npz of measurements (see the module docstring). Raises DataError."""
  with _open_npz(path, "data.path") as npz:
    keys = list(npz.keys())
    if "y" not in keys:
      raise DataError(f"data.path={path!r}: the .npz has no array 'y' (found: "
                      f"{', '.join(keys) or 'none'}); expected the measurements as 'y' "
                      "[N, H, W] or [N, H, W, C].")
    y_raw = _check_npz_shape(_npz_array(npz, path, "y"), f"{path}: array 'y'")
    mask = None
    if needs_mask:
      if "mask" not in keys:
        raise DataError(f"data.path={path!r}: operator.name={operator_name!r} needs a mask per "
                        f"measurement, but the .npz has no array 'mask' (found: "
                        f"{', '.join(keys)}); expected 'mask' [N, H, W] or [N, H, W, 1], "
                        "1 = observed.")
      mask = _npz_array(npz, path, "mask")
      if mask.ndim == 3:
        mask = mask[..., None]
      if mask.ndim != 4 or mask.shape[-1] != 1 or mask.shape[:3] != y_raw.shape[:3]:
        raise DataError(f"{path}: array 'mask' has shape {mask.shape}, 'y' has {y_raw.shape}; "
                        f"expected [N, H, W] or [N, H, W, 1] = {y_raw.shape[:3]} (+ (1,)): one "
                        "mask per measurement, shared by its channels.")
      mask = _binary_mask(mask, f"{path}: array 'mask'")
    elif "mask" in keys:
      raise DataError(f"data.path={path!r}: the .npz has a 'mask' but operator.name="
                      f"{operator_name!r} takes none; use operator.name='inpaint_random' (the "
                      "masks then come from the file) or remove the 'mask' array.")
  _check_square(y_raw.shape[1:3], f"{path}: array 'y'")
  names = [f"y[{i}]" for i in range(len(y_raw))]
  return _finish(y_raw, mask, names, y_raw.dtype, value_range, value_margin, path,
                 f"{path}: array 'y'")


def load_folder(path: str, mask_dir: str | None = None, *, needs_mask: bool,
                value_range=None, value_margin: float = 1.0,
                operator_name: str = "") -> Measurements:
  """Reads a folder of images (and of masks) as measurements (see the module docstring)."""
  names = _list_images(path, "data.path")
  if needs_mask and not mask_dir:
    raise DataError(f"operator.name={operator_name!r} needs a mask per measurement: set "
                    f"data.mask_dir to a folder holding a mask for each image in {path} under "
                    "the image's file name.")
  if mask_dir and not needs_mask:
    raise DataError(f"data.mask_dir={mask_dir!r} is set but operator.name={operator_name!r} "
                    "takes no mask; use operator.name='inpaint_random' (the masks then come "
                    "from the files) or unset data.mask_dir.")
  y_raw, dtype = _stack_images(path, names, f"data.path={path!r}")
  _check_square(y_raw.shape[1:3], f"data.path={path!r}")
  mask = None
  if needs_mask:
    if not epath.Path(mask_dir).is_dir():
      raise DataError(f"data.mask_dir={mask_dir!r}: no such folder; expected a folder of masks "
                      "named like the images.")
    mask = np.stack([_mask_from_image(_matching_file(mask_dir, n, "The mask"), y_raw.shape[1:],
                                      os.path.join(path, n)) for n in names])
  return _finish(y_raw, mask, names, dtype, value_range, value_margin, path,
                 f"data.path={path!r}")


def load_reference(path: str, measured: Measurements, *, value_range=None,
                   value_margin: float = 1.0) -> np.ndarray:
  """The clean reference of `measured`, float32 [N, H, W, C] in model units (evaluation only).

  `path` is an .npz with array 'x' in the measurements' order and shape, or a
  folder with an image for every measurement under the same file name.
  """
  if path.lower().endswith(".npz"):
    with _open_npz(path, "data.reference_path") as npz:
      if "x" not in npz:
        raise DataError(f"data.reference_path={path!r}: the .npz has no array 'x' (found: "
                        f"{', '.join(npz.keys()) or 'none'}); expected the clean images as 'x'.")
      raw = _check_npz_shape(_npz_array(npz, path, "x"), f"{path}: array 'x'")
    dtype, where = raw.dtype, f"{path}: array 'x'"
  else:
    if not epath.Path(path).is_dir():
      raise DataError(f"data.reference_path={path!r}: no such .npz file or folder.")
    files = [_matching_file(path, n, "The reference image") for n in measured.names]
    raw, dtype = _stack_images(path, [os.path.basename(f) for f in files],
                               f"data.reference_path={path!r}")
    where = f"data.reference_path={path!r}"
  if raw.shape != (len(measured),) + measured.image_shape:
    expected = (len(measured),) + measured.image_shape
    raise DataError(f"{where}: shape {raw.shape}; expected {expected}, one clean image per "
                    f"measurement in {measured.path}.")
  ref_range = value_range_for(dtype, value_range, where)
  x = to_model_units(raw, ref_range)
  _check_values(x, None, ref_range, value_margin, where, default_range=value_range is None)
  return x


@functools.lru_cache(maxsize=4)
def _load_cached(kind: str, path: str, mask_dir, needs_mask: bool, value_range, margin: float,
                 operator_name: str, reference_path, stamp) -> Measurements:
  del stamp  # part of the cache key only: a changed file or folder is read again
  if kind == "npz":
    m = load_npz(path, needs_mask=needs_mask, value_range=value_range, value_margin=margin,
                 operator_name=operator_name)
  else:
    m = load_folder(path, mask_dir, needs_mask=needs_mask, value_range=value_range,
                    value_margin=margin, operator_name=operator_name)
  if reference_path:
    m = dataclasses.replace(m, x=load_reference(reference_path, m, value_range=value_range,
                                                value_margin=margin))
  return m


def _stamp(*paths) -> tuple:
  out = []
  for p in paths:
    try:
      st = os.stat(p) if p else None
    except OSError:
      st = None
    out.append(None if st is None else (st.st_mtime_ns, st.st_size))
  return tuple(out)


def load(config) -> Measurements:
  """The measurement set `config.data` describes (read once per process; cached).

  Raises DataError naming the file or field when the files do not fit the config.
  """
  d = config.data
  if d.dataset not in KINDS:
    raise ValueError(f"config.data.dataset={d.dataset!r} is not a measurement file kind "
                     f"({', '.join(KINDS)}).")
  if not d.get("path"):
    raise DataError(f"config.data.path={d.get('path')!r}: data.dataset={d.dataset!r} needs "
                    "the path of the measurements (an .npz file or an image folder).")
  value_range = d.get("value_range")
  value_range = None if value_range is None else tuple(float(v) for v in value_range)
  path, mask_dir, ref = d.path, d.get("mask_dir") or None, d.get("reference_path") or None
  return _load_cached(d.dataset, path, mask_dir, config.operator.name in MASK_OPERATORS,
                      value_range, float(d.get("value_margin", 1.0)), config.operator.name,
                      ref, _stamp(path, mask_dir, ref))


def image_shape(config) -> tuple[int, int, int]:
  """(H, W, C) of a measurement config: from data.image_size/channels once set, else the files."""
  size, channels = config.data.image_size, config.data.get("channels", 0)
  if size and channels:
    return (size, size, channels)
  return load(config).image_shape


# --------------------------------------------------------------------------
# Noise level from the data.
# --------------------------------------------------------------------------


def estimate_sigma_y(y: np.ndarray, mask: np.ndarray | None = None) -> tuple[float, int]:
  """σ_y of additive Gaussian noise in `y`, by the finest-scale Haar wavelet MAD (Donoho).

  Every non-overlapping 2x2 block [[a, b], [c, d]] whose four pixels are
  observed gives the diagonal Haar detail (a - b - c + d) / 2: for
  y = signal + σ ε it is the signal's diagonal detail plus σ N(0, 1). The
  median absolute detail over all such blocks of all images and channels,
  divided by 0.6745 (the MAD of N(0, 1)), estimates σ. It is exact for flat
  signal and for blurred signal (a blur leaves almost no diagonal detail), and
  biased upwards on fine texture, so treat it as an upper estimate there.
  This is scikit-image's `restoration.estimate_sigma` (db1 wavelet, one level),
  restricted to fully observed blocks so that it also works with masks.

  Args:
    y: float [N, H, W, C] in model units.
    mask: float [N, H, W, 1] (1 = observed) or None (all observed).

  Returns:
    (σ estimate in the same units as y, number of blocks used).
  """
  n, h, w, c = y.shape
  h2, w2 = h // 2 * 2, w // 2 * 2
  blocks = np.asarray(y[:, :h2, :w2], np.float64).reshape(n, h2 // 2, 2, w2 // 2, 2, c)
  detail = (blocks[:, :, 0, :, 0] - blocks[:, :, 0, :, 1] - blocks[:, :, 1, :, 0]
            + blocks[:, :, 1, :, 1]) / 2.0  # [N, H/2, W/2, C]
  if mask is None:
    used = detail.reshape(-1)
  else:
    m = np.asarray(mask[:, :h2, :w2, 0] > 0).reshape(n, h2 // 2, 2, w2 // 2, 2)
    full = m.all(axis=(2, 4))  # [N, H/2, W/2]: all four pixels observed
    used = detail[full].reshape(-1)
  if used.size == 0:
    return float("nan"), 0
  return float(np.median(np.abs(used)) / 0.6744897501960817), int(used.size // c)


def sigma_report(m: Measurements, configured: float, used: bool) -> dict[str, Any]:
  """The σ_y estimate of a measurement set, as written to <workdir>/sigma_y_estimate.json."""
  sigma, blocks = estimate_sigma_y(m.y, m.mask)
  lo, hi = m.value_range
  return {
      "path": m.path,
      "sigma_y_estimate": sigma,  # [-1, 1] scale, like operator.sigma_y
      "sigma_y_estimate_file_units": sigma * (hi - lo) / 2.0,
      "value_range": [lo, hi],
      "blocks_used": blocks,
      "reliable": blocks >= MIN_SIGMA_BLOCKS,
      "sigma_y_configured": configured,
      "sigma_y_used": sigma if used else configured,
      "estimator": "median |diagonal Haar detail| / 0.6745 over fully observed 2x2 blocks "
                   "(Donoho's MAD; an upper estimate on fine texture)",
  }


# --------------------------------------------------------------------------
# Random-access sources for the grain pipeline.
# --------------------------------------------------------------------------


class MeasurementSource:
  """Examples [start, stop) of a measurement set as {"y": [H, W, C], "mask": [H, W, 1], "x": ...}.

  "mask" only for masking operators; "x" (the clean reference) only when
  `with_reference` and the set has one: training sources never carry it.
  """

  def __init__(self, m: Measurements, start: int = 0, stop: int | None = None, *,
               with_reference: bool = False):
    self._m = m
    self._start = start
    self._stop = len(m) if stop is None else stop
    self._x = m.x if with_reference else None

  def __len__(self) -> int:
    return self._stop - self._start

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    i = self._start + index
    out = {"y": self._m.y[i]}
    if self._m.mask is not None:
      out["mask"] = self._m.mask[i]
    if self._x is not None:
      out["x"] = self._x[i]
    return out


def eval_range(config, num: int) -> tuple[int, int]:
  """[start, stop) of the measurements used for evaluation.

  The measurements after the first data.max_train_examples when that leaves
  any (a held-out part); otherwise all of them, i.e. the set being restored:
  ground-truth-free metrics on the training measurements are what a user with
  no clean data can check.
  """
  limit = config.data.max_train_examples
  return (limit, num) if 0 < limit < num else (0, num)


def make_source(config, split: str) -> MeasurementSource:
  """The training ("train", all measurements, no reference) or evaluation source."""
  m = load(config)
  if split == "train":
    return MeasurementSource(m)
  start, stop = eval_range(config, len(m))
  return MeasurementSource(m, start, stop, with_reference=True)
