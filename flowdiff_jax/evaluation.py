"""Evaluation helpers: image quality metrics and sample grids.

Images are float arrays in [-1, 1] unless a docstring says uint8.
"""

from __future__ import annotations

import os

import jax.numpy as jnp
import numpy as np


def psnr(x: jnp.ndarray, ref: jnp.ndarray) -> jnp.ndarray:
  """Per-example PSNR in dB of x against ref, both [B, H, W, C] in [-1, 1] (peak-to-peak 2)."""
  mse = jnp.mean(jnp.square(x - ref), axis=(1, 2, 3))
  return 10.0 * jnp.log10(4.0 / jnp.maximum(mse, 1e-12))


def image_grid(images: np.ndarray, num_cols: int | None = None, pad: int = 1) -> np.ndarray:
  """Tiles uint8 images [N, H, W, C] into one uint8 image [rows*(H+pad)+pad, cols*(W+pad)+pad, C]."""
  n, h, w, c = images.shape
  cols = num_cols or int(np.ceil(np.sqrt(n)))
  rows = int(np.ceil(n / cols))
  grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), 255, np.uint8)
  for i, image in enumerate(images):
    r, q = divmod(i, cols)
    top, left = pad + r * (h + pad), pad + q * (w + pad)
    grid[top:top + h, left:left + w] = image
  return grid


def save_png(path: str, image: np.ndarray) -> None:
  """Writes a uint8 [H, W, C] image (C = 1 or 3) as PNG, creating folders as needed."""
  from PIL import Image  # only the writers need pillow

  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(path)
