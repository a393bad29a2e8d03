"""The Fashion-MNIST images and observations that the experiment scripts share.

Images come from the Debian package's idx files (the ones `make setup`
installs), in [-1, 1], float32 [N, 28, 28, 1]. Observations are made exactly as
training and evaluation make them: `operators.corrupt` of each image with its
own index in its split and the config's data.corruption_seed, so the test
observations here are the ones `flowdiff_jax.evaluate` restores.
"""

import os

import jax
import jax.numpy as jnp

from flowdiff_jax import data, operators
from flowdiff_jax.configs import fmnist_blur, fmnist_inpaint, fmnist_noise

CONFIGS = {"denoise": fmnist_noise, "inpaint": fmnist_inpaint, "blur": fmnist_blur}
FMNIST = "/usr/share/datasets/fashion-mnist"


def task_operator(task: str) -> tuple[operators.Operator, int]:
  """(operator, corruption seed) of the task's config (configs/fmnist_*.py)."""
  config = CONFIGS[task].get_config()
  return operators.make_operator(config.operator), config.data.corruption_seed


def load(split: str, n: int, first: int = 0) -> jax.Array:
  """Images first..first+n-1 of a split ("train" | "test") in [-1, 1], float32 [n, 28, 28, 1]."""
  name = {"train": "train-images-idx3-ubyte.gz", "test": "t10k-images-idx3-ubyte.gz"}[split]
  images = data.read_idx_images(os.path.join(FMNIST, name))[first:first + n]
  return data.to_model_range(jnp.asarray(images))


def corrupt(op: operators.Operator, x: jax.Array, seed: int, first: int = 0,
            chunk: int = 10_000) -> tuple[jax.Array, dict]:
  """(y, omega) of x [N, H, W, C], image i having index first + i; in chunks of `chunk`."""
  fn = jax.jit(lambda xx, idx: operators.corrupt(op, xx, idx, seed))
  parts = [fn(x[s:s + chunk], jnp.arange(first + s, first + min(s + chunk, x.shape[0])))
           for s in range(0, x.shape[0], chunk)]
  measured = jax.tree.map(lambda *a: jnp.concatenate(a), *parts)
  return measured.pop("y"), measured
