"""The FID Inception-v3 in Flax: pool3 features (2048-d) for the Fréchet Inception Distance.

This is the network of the standard FID (Heusel et al. 2017; TensorFlow's
`inception-2015-12-05` graph) as ported by pytorch-fid
(github.com/mseitzer/pytorch-fid, `fid_inception_v3`): torchvision's
Inception-v3 layout with the FID graph's differences, namely

  * the average pools inside the Mixed_5*, 6b-6e and 7b blocks exclude the
    zero padding from the mean (TensorFlow's `count_include_pad=False`);
  * Mixed_7c's pool branch is a 3x3 *max* pool (stride 1, padding 1);
  * inputs in [-1, 1], bilinearly resized to 299x299 (half-pixel centres,
    no antialiasing: torch's `interpolate(..., align_corners=False)`);
  * the features are the global mean of Mixed_7c's output ("pool3").

Every convolution is a BasicConv2d: conv without bias, BatchNorm (eps 1e-3,
running statistics), ReLU.

Weights cannot be downloaded here. `scripts/convert_fid_inception.py` turns
pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` into an .npz of the torch
state dict (torch key names, torch layouts); `load_variables` reads that .npz
(or a flax .msgpack written by `save_variables`), checks every name and shape,
and returns the Flax variables {"params", "batch_stats"}. The README's
"Evaluation" section has the steps.
"""

from __future__ import annotations

from collections.abc import Sequence
import functools
import os

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

FEATURE_DIM = 2048
INPUT_SIZE = 299
# The smallest input the stride-2 stem and reductions accept (torchvision's min_size).
MIN_INPUT_SIZE = 75
FID_WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                   "pt_inception-2015-12-05-6726825d.pth")
# State-dict entries of the torch checkpoint that the pool3 features do not use.
_UNUSED_PREFIXES = ("fc.", "AuxLogits.")
_UNUSED_SUFFIXES = ("num_batches_tracked",)


def _pair(v: int | Sequence[int]) -> tuple[int, int]:
  return (v, v) if isinstance(v, int) else tuple(v)


class BasicConv(nn.Module):
  """conv (no bias) -> BatchNorm (eps 1e-3, running stats) -> ReLU; torch padding semantics."""
  features: int
  kernel: int | Sequence[int]
  strides: int | Sequence[int] = 1
  padding: int | Sequence[int] = 0

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    ph, pw = _pair(self.padding)
    # Zero init: the weights always come from a file (or `random_variables`);
    # `init` only gives shapes, and zeros trace far faster than random draws.
    x = nn.Conv(self.features, _pair(self.kernel), _pair(self.strides),
                padding=((ph, ph), (pw, pw)), use_bias=False, kernel_init=nn.initializers.zeros,
                name="conv")(x)
    x = nn.BatchNorm(use_running_average=True, epsilon=1e-3, name="bn")(x)
    return nn.relu(x)


def _avg_pool_3x3(x):
  # The FID graph averages over the valid (unpadded) pixels only.
  return nn.avg_pool(x, (3, 3), (1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3_s2(x):
  return nn.max_pool(x, (3, 3), (2, 2), padding="VALID")


class InceptionA(nn.Module):
  pool_features: int

  @nn.compact
  def __call__(self, x):
    b1 = BasicConv(64, 1, name="branch1x1")(x)
    b5 = BasicConv(48, 1, name="branch5x5_1")(x)
    b5 = BasicConv(64, 5, padding=2, name="branch5x5_2")(b5)
    b3 = BasicConv(64, 1, name="branch3x3dbl_1")(x)
    b3 = BasicConv(96, 3, padding=1, name="branch3x3dbl_2")(b3)
    b3 = BasicConv(96, 3, padding=1, name="branch3x3dbl_3")(b3)
    bp = BasicConv(self.pool_features, 1, name="branch_pool")(_avg_pool_3x3(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):

  @nn.compact
  def __call__(self, x):
    b3 = BasicConv(384, 3, strides=2, name="branch3x3")(x)
    bd = BasicConv(64, 1, name="branch3x3dbl_1")(x)
    bd = BasicConv(96, 3, padding=1, name="branch3x3dbl_2")(bd)
    bd = BasicConv(96, 3, strides=2, name="branch3x3dbl_3")(bd)
    return jnp.concatenate([b3, bd, _max_pool_3x3_s2(x)], axis=-1)


class InceptionC(nn.Module):
  channels_7x7: int

  @nn.compact
  def __call__(self, x):
    c7 = self.channels_7x7
    b1 = BasicConv(192, 1, name="branch1x1")(x)
    b7 = BasicConv(c7, 1, name="branch7x7_1")(x)
    b7 = BasicConv(c7, (1, 7), padding=(0, 3), name="branch7x7_2")(b7)
    b7 = BasicConv(192, (7, 1), padding=(3, 0), name="branch7x7_3")(b7)
    bd = BasicConv(c7, 1, name="branch7x7dbl_1")(x)
    bd = BasicConv(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_2")(bd)
    bd = BasicConv(c7, (1, 7), padding=(0, 3), name="branch7x7dbl_3")(bd)
    bd = BasicConv(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_4")(bd)
    bd = BasicConv(192, (1, 7), padding=(0, 3), name="branch7x7dbl_5")(bd)
    bp = BasicConv(192, 1, name="branch_pool")(_avg_pool_3x3(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):

  @nn.compact
  def __call__(self, x):
    b3 = BasicConv(192, 1, name="branch3x3_1")(x)
    b3 = BasicConv(320, 3, strides=2, name="branch3x3_2")(b3)
    b7 = BasicConv(192, 1, name="branch7x7x3_1")(x)
    b7 = BasicConv(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
    b7 = BasicConv(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
    b7 = BasicConv(192, 3, strides=2, name="branch7x7x3_4")(b7)
    return jnp.concatenate([b3, b7, _max_pool_3x3_s2(x)], axis=-1)


class InceptionE(nn.Module):
  """pool: "avg" (Mixed_7b) or "max" (Mixed_7c: the FID graph's max pool)."""
  pool: str

  @nn.compact
  def __call__(self, x):
    b1 = BasicConv(320, 1, name="branch1x1")(x)
    b3 = BasicConv(384, 1, name="branch3x3_1")(x)
    b3 = jnp.concatenate([BasicConv(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(b3),
                          BasicConv(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(b3)],
                         axis=-1)
    bd = BasicConv(448, 1, name="branch3x3dbl_1")(x)
    bd = BasicConv(384, 3, padding=1, name="branch3x3dbl_2")(bd)
    bd = jnp.concatenate([BasicConv(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(bd),
                          BasicConv(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(bd)],
                         axis=-1)
    if self.pool == "max":
      pooled = nn.max_pool(x, (3, 3), (1, 1), padding=((1, 1), (1, 1)))
    else:
      pooled = _avg_pool_3x3(x)
    bp = BasicConv(192, 1, name="branch_pool")(pooled)
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)


def resize(images: jax.Array, size: int = INPUT_SIZE) -> jax.Array:
  """Bilinear resize of images [B, H, W, C] to [B, size, size, C], as the FID port does it.

  Half-pixel centres and no antialiasing: torch's
  `F.interpolate(x, (299, 299), mode="bilinear", align_corners=False)`.
  """
  return jax.image.resize(images, (images.shape[0], size, size, images.shape[3]), "bilinear",
                          antialias=False)


class FIDInceptionV3(nn.Module):
  """images [B, H, W, 3] in [-1, 1] -> pool3 features [B, 2048].

  resize_to: side the input is bilinearly resized to (299 for FID; None keeps
  the input size, at least MIN_INPUT_SIZE: only for tests on small inputs).
  """
  resize_to: int | None = INPUT_SIZE

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = x.astype(jnp.float32)
    if self.resize_to:
      x = resize(x, self.resize_to)
    if min(x.shape[1:3]) < MIN_INPUT_SIZE:
      raise ValueError(f"Inception needs inputs of at least {MIN_INPUT_SIZE}x{MIN_INPUT_SIZE} "
                       f"pixels, got {x.shape[1]}x{x.shape[2]}.")
    x = BasicConv(32, 3, strides=2, name="Conv2d_1a_3x3")(x)
    x = BasicConv(32, 3, name="Conv2d_2a_3x3")(x)
    x = BasicConv(64, 3, padding=1, name="Conv2d_2b_3x3")(x)
    x = _max_pool_3x3_s2(x)
    x = BasicConv(80, 1, name="Conv2d_3b_1x1")(x)
    x = BasicConv(192, 3, name="Conv2d_4a_3x3")(x)
    x = _max_pool_3x3_s2(x)
    x = InceptionA(32, name="Mixed_5b")(x)
    x = InceptionA(64, name="Mixed_5c")(x)
    x = InceptionA(64, name="Mixed_5d")(x)
    x = InceptionB(name="Mixed_6a")(x)
    x = InceptionC(128, name="Mixed_6b")(x)
    x = InceptionC(160, name="Mixed_6c")(x)
    x = InceptionC(160, name="Mixed_6d")(x)
    x = InceptionC(192, name="Mixed_6e")(x)
    x = InceptionD(name="Mixed_7a")(x)
    x = InceptionE("avg", name="Mixed_7b")(x)
    x = InceptionE("max", name="Mixed_7c")(x)
    return jnp.mean(x, axis=(1, 2))


# --------------------------------------------------------------------------
# Variables: random init, the torch state-dict layout, files.
# --------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def abstract_variables() -> dict:
  """The variables' shapes and dtypes (jax.ShapeDtypeStruct leaves), without computing them.

  Cached: tracing the init of 94 convolutions takes seconds.
  """
  net = FIDInceptionV3(resize_to=None)
  return jax.eval_shape(net.init, jax.random.key(0),
                        jnp.zeros((1, MIN_INPUT_SIZE, MIN_INPUT_SIZE, 3)))


def random_variables(seed: int = 0) -> dict:
  """Random variables {"params", "batch_stats"}, for tests (FID needs the converted weights).

  Drawn on the host with numpy: jitting `init` of 94 convolutions compiles
  for minutes on a small CPU. He-normal kernels keep activations O(1) through
  the ReLUs; the BatchNorm entries are random too, so that a loader that mixes
  up two of them is caught.
  """
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name = path[-1].key
    if name == "kernel":
      fan_in = np.prod(leaf.shape[:-1])
      return rng.normal(0.0, np.sqrt(2.0 / fan_in), leaf.shape).astype(np.float32)
    if name in ("scale", "var"):
      return rng.uniform(0.5, 1.5, leaf.shape).astype(np.float32)
    return rng.normal(0.0, 0.1, leaf.shape).astype(np.float32)  # bias, mean

  return jax.tree_util.tree_map_with_path(draw, abstract_variables())


# Flax leaf (collection, leaf name) <-> torch state-dict suffix, per BasicConv.
_TORCH_NAMES = {("params", "conv", "kernel"): "conv.weight",
                ("params", "bn", "scale"): "bn.weight",
                ("params", "bn", "bias"): "bn.bias",
                ("batch_stats", "bn", "mean"): "bn.running_mean",
                ("batch_stats", "bn", "var"): "bn.running_var"}


def _torch_key(path: tuple[str, ...]) -> str:
  """("params", "Mixed_5b", "branch1x1", "conv", "kernel") -> "Mixed_5b.branch1x1.conv.weight"."""
  collection, *modules, layer, leaf = path
  return ".".join(modules + [_TORCH_NAMES[(collection, layer, leaf)]])


def _to_torch_layout(value: np.ndarray) -> np.ndarray:
  # Flax conv kernels are HWIO, torch's OIHW; BatchNorm vectors are the same.
  return np.transpose(value, (3, 2, 0, 1)) if value.ndim == 4 else value


def _from_torch_layout(value: np.ndarray) -> np.ndarray:
  return np.transpose(value, (2, 3, 1, 0)) if value.ndim == 4 else value


def _leaves_by_path(tree: dict) -> dict[tuple[str, ...], object]:
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(tree))
  return {tuple(k): v for k, v in flat.items()}


def to_torch_state_dict(variables: dict) -> dict[str, np.ndarray]:
  """Flax variables -> {torch key: array in torch layout} (what the conversion script writes)."""
  return {_torch_key(path): _to_torch_layout(np.asarray(value))
          for path, value in _leaves_by_path(jax.device_get(variables)).items()}


def from_torch_state_dict(state_dict: dict[str, np.ndarray], source: str = "state dict") -> dict:
  """{torch key: array} (pytorch-fid's FID Inception state dict) -> Flax variables.

  Entries the pool3 features do not use (fc.*, AuxLogits.*, num_batches_tracked)
  are ignored.

  Raises:
    ValueError: a needed entry is missing, an entry is unknown, or a shape differs;
      the message names the entries and `source`.
  """
  used = {k: v for k, v in state_dict.items()
          if not k.startswith(_UNUSED_PREFIXES) and not k.endswith(_UNUSED_SUFFIXES)}
  template = _leaves_by_path(abstract_variables())
  expected = {_torch_key(path): path for path in template}
  missing = sorted(set(expected) - set(used))
  unknown = sorted(set(used) - set(expected))
  if missing or unknown:
    raise ValueError(
        f"{source} is not the FID Inception-v3 state dict: {len(missing)} entries missing "
        f"(e.g. {missing[:3]}), {len(unknown)} unknown (e.g. {unknown[:3]}). Convert "
        "pytorch-fid's pt_inception-2015-12-05-6726825d.pth with "
        "scripts/convert_fid_inception.py (README, Evaluation).")
  flat = {}
  for key, path in expected.items():
    value = _from_torch_layout(np.asarray(used[key], np.float32))
    want = template[path].shape
    if value.shape != want:
      raise ValueError(f"{source}: {key} has shape {np.asarray(used[key]).shape} (torch "
                       f"layout), expected {_to_torch_layout(np.zeros(want)).shape}.")
    flat[path] = value
  return flax.traverse_util.unflatten_dict(flat)


def save_variables(path: str, variables: dict) -> None:
  """Writes variables as .npz (torch state-dict keys and layouts) or .msgpack (the flax tree)."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  if path.endswith(".msgpack"):
    with open(path, "wb") as f:
      f.write(flax.serialization.msgpack_serialize(jax.device_get(flax.core.unfreeze(variables))))
  elif path.endswith(".npz"):
    np.savez(path, **to_torch_state_dict(variables))
  else:
    raise ValueError(f"Inception weights path must end in .npz or .msgpack, got {path!r}.")


def load_variables(path: str) -> dict:
  """The FID Inception variables {"params", "batch_stats"} from an .npz or .msgpack file.

  .npz: the torch state dict written by scripts/convert_fid_inception.py;
  .msgpack: a flax tree written by `save_variables`.

  Raises:
    FileNotFoundError: no file at `path` (the message says how to make one).
    ValueError: the file's names or shapes are not this network's.
  """
  if not os.path.exists(path):
    raise FileNotFoundError(
        f"No Inception weights at {path!r}. Download pytorch-fid's FID Inception weights "
        f"({FID_WEIGHTS_URL}) on a machine with torch and run "
        "`python scripts/convert_fid_inception.py pt_inception-2015-12-05-6726825d.pth "
        "fid_inception.npz` (README, Evaluation).")
  if path.endswith(".npz"):
    with np.load(path) as f:
      return from_torch_state_dict({k: f[k] for k in f.files}, source=path)
  if path.endswith(".msgpack"):
    with open(path, "rb") as f:
      variables = flax.serialization.msgpack_restore(f.read())
    got = {p: tuple(np.shape(v)) for p, v in _leaves_by_path(variables).items()}
    want = {p: tuple(v.shape) for p, v in _leaves_by_path(abstract_variables()).items()}
    if got != want:
      bad = sorted(set(got.items()) ^ set(want.items()))[:3]
      raise ValueError(f"{path} does not hold FID Inception-v3 variables (names or shapes "
                       f"differ, e.g. {bad}).")
    return variables
  raise ValueError(f"Inception weights path must end in .npz or .msgpack, got {path!r}.")


@functools.cache
def _jitted_features(resize_to: int | None):
  net = FIDInceptionV3(resize_to=resize_to)
  return jax.jit(net.apply)


def make_feature_fn(variables: dict, *, resize_to: int | None = INPUT_SIZE):
  """A function images [B, H, W, C] in [-1, 1] (C = 1 or 3) -> pool3 features [B, 2048].

  Grayscale images are repeated to RGB (outside the jitted network, so one
  compilation serves both). The variables are an argument of the jitted
  network, not constants baked into it, so other weights of the same shapes
  reuse its compilation.
  """
  apply = _jitted_features(resize_to)

  def features(images):
    images = jnp.asarray(images)
    if images.shape[-1] == 1:
      images = jnp.repeat(images, 3, axis=-1)
    return apply(variables, images)

  return features
