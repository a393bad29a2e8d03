"""A small Fashion-MNIST classifier whose penultimate features define FD-FMNIST.

The Fréchet distance and KID of Fashion-MNIST samples are computed on the
128-d penultimate features of this CNN, trained on the *clean* Fashion-MNIST
training images by `experiments/fmnist_classifier/train.py` (its test accuracy
is in that folder's README). Distances on these features are named FD-FMNIST
and KID-FMNIST, never FID: the network is ours, not the FID Inception, so the
numbers are comparable only with other numbers from the same weights file.

Layout: three 3x3 convs with ReLU (32 at 28x28, 64 stride 2 -> 14x14, 32
stride 2 -> 7x7), flattened, Dense(128) + ReLU (the features), Dense(10)
(the logits): 239k parameters (0.96 MB in float32), small enough to train in
minutes on a CPU.
"""

from __future__ import annotations

import gzip
import os

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

# The committed weights (flax msgpack of the params tree), trained by
# experiments/fmnist_classifier/train.py.
DEFAULT_WEIGHTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights",
                               "fmnist_classifier.msgpack")
IMAGE_SHAPE = (28, 28, 1)
FEATURE_DIM = 128
CLASS_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
               "Sneaker", "Bag", "Ankle boot")


class FMNISTClassifier(nn.Module):
  """x [B, 28, 28, 1] in [-1, 1] -> (logits [B, 10], features [B, 128])."""
  num_classes: int = 10
  feature_dim: int = FEATURE_DIM

  @nn.compact
  def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    h = x.astype(jnp.float32)
    for i, (channels, stride) in enumerate(((32, 1), (64, 2), (32, 2))):
      h = nn.relu(nn.Conv(channels, (3, 3), strides=(stride, stride), padding="SAME",
                          name=f"conv{i}")(h))
    # Flattened, not mean-pooled: where a shape sits in the 7x7 grid tells the classes apart.
    h = h.reshape(h.shape[0], -1)
    features = nn.relu(nn.Dense(self.feature_dim, name="features")(h))
    return nn.Dense(self.num_classes, name="logits")(features), features


def init_params(rng: jax.Array) -> dict:
  """Fresh (untrained) params."""
  return FMNISTClassifier().init(rng, jnp.zeros((1, *IMAGE_SHAPE)))["params"]


def save_params(path: str, params: dict) -> None:
  """Writes params as flax msgpack (a few hundred kB)."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "wb") as f:
    f.write(flax.serialization.msgpack_serialize(jax.device_get(params)))


def load_params(path: str | None = None) -> dict:
  """The classifier's params from `path` (default: the committed DEFAULT_WEIGHTS).

  Raises:
    FileNotFoundError: no file at `path`.
    ValueError: the file does not hold this network's params (names or shapes differ).
  """
  path = path or DEFAULT_WEIGHTS
  if not os.path.exists(path):
    raise FileNotFoundError(
        f"No Fashion-MNIST classifier weights at {path}; train them with "
        "`python experiments/fmnist_classifier/train.py`.")
  with open(path, "rb") as f:
    params = flax.serialization.msgpack_restore(f.read())
  expected = jax.eval_shape(init_params, jax.random.key(0))
  got = jax.tree.map(lambda a: (tuple(a.shape), str(a.dtype)), params)
  want = jax.tree.map(lambda a: (tuple(a.shape), str(a.dtype)), expected)
  if got != want:
    raise ValueError(f"{path} does not hold FMNISTClassifier params: expected {want}, "
                     f"got {got}.")
  return params


@jax.jit
def _features(params: dict, images: jax.Array) -> jax.Array:
  return FMNISTClassifier().apply({"params": params}, images)[1]


@jax.jit
def logits(params: dict, images: jax.Array) -> jax.Array:
  """Class logits [B, 10] of images [B, 28, 28, 1] in [-1, 1]."""
  return FMNISTClassifier().apply({"params": params}, images)[0]


def make_feature_fn(params: dict):
  """A function images [B, 28, 28, 1] in [-1, 1] -> penultimate features [B, 128] (jitted).

  The params are an argument of the jitted network (not constants baked into
  the program), so other weights reuse its compilation.
  """
  return lambda images: _features(params, images)


def read_idx_labels(path: str) -> np.ndarray:
  """Reads a (gzipped) idx1 label file into uint8 [N]."""
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "rb") as f:
    raw = f.read()
  magic, n = np.frombuffer(raw[:8], dtype=">u4")
  if magic != 2049:
    raise ValueError(f"{path} is not an idx1 label file (magic number {magic}).")
  return np.frombuffer(raw, dtype=np.uint8, offset=8)[:n]
