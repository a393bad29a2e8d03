"""Evaluation helpers: image quality metrics and sample grids.

Images are float arrays in [-1, 1] unless a docstring says uint8.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np


def psnr(x: jnp.ndarray, ref: jnp.ndarray) -> jnp.ndarray:
  """Per-example PSNR in dB of x against ref, both [B, H, W, C] in [-1, 1] (peak-to-peak 2)."""
  mse = jnp.mean(jnp.square(x - ref), axis=(1, 2, 3))
  return 10.0 * jnp.log10(4.0 / jnp.maximum(mse, 1e-12))


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> jnp.ndarray:
  t = jnp.arange(size, dtype=jnp.float32) - (size - 1) / 2
  w = jnp.exp(-0.5 * jnp.square(t / sigma))
  return w / jnp.sum(w)


def ssim(x: jnp.ndarray, ref: jnp.ndarray, *, window: int = 11, sigma: float = 1.5,
         k1: float = 0.01, k2: float = 0.03) -> jnp.ndarray:
  """Per-example SSIM of x against ref, both [B, H, W, C] in [-1, 1] (data range 2).

  The standard Gaussian-window SSIM of Wang et al. (2004): local statistics
  under an 11x11 Gaussian window of std 1.5 (population variances), averaged
  over the window positions that fit inside the image ("valid") and over
  channels. This is scikit-image's `structural_similarity(...,
  gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
  data_range=2)`. Images must be at least `window` pixels on each side.
  """
  if min(x.shape[1:3]) < window:
    raise ValueError(f"SSIM needs images of at least {window}x{window} pixels, got "
                     f"{x.shape[1]}x{x.shape[2]}.")
  g = _gaussian_window(window, sigma)
  c1, c2 = (k1 * 2.0) ** 2, (k2 * 2.0) ** 2

  def blur(a):  # [B, H, W, C] -> [B, H-window+1, W-window+1, C], separable valid filter
    a = jnp.moveaxis(a, -1, 1)[..., None]  # [B, C, H, W, 1]
    flat = a.reshape((-1,) + a.shape[2:])
    kernel_h = g.reshape(window, 1, 1, 1)
    kernel_w = g.reshape(1, window, 1, 1)
    dims = ("NHWC", "HWIO", "NHWC")
    out = jax.lax.conv_general_dilated(flat, kernel_h, (1, 1), "VALID", dimension_numbers=dims)
    out = jax.lax.conv_general_dilated(out, kernel_w, (1, 1), "VALID", dimension_numbers=dims)
    return jnp.moveaxis(out[..., 0].reshape(a.shape[:2] + out.shape[1:3]), 1, -1)

  x, ref = x.astype(jnp.float32), ref.astype(jnp.float32)
  mu_x, mu_r = blur(x), blur(ref)
  var_x = blur(x * x) - mu_x ** 2
  var_r = blur(ref * ref) - mu_r ** 2
  cov = blur(x * ref) - mu_x * mu_r
  ssim_map = ((2 * mu_x * mu_r + c1) * (2 * cov + c2)
              / ((mu_x ** 2 + mu_r ** 2 + c1) * (var_x + var_r + c2)))
  return jnp.mean(ssim_map, axis=(1, 2, 3))


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
