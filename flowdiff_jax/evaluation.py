"""Evaluation metrics and sample grids.

* Reconstruction: `psnr`, `ssim` (per example, jittable).
* Distribution distances on features (host-side numpy, float64):
  `feature_statistics` + `frechet_distance` (FID when the features are the FID
  Inception's pool3, FD-FMNIST on our Fashion-MNIST classifier's), `kid` (the
  unbiased MMD² with the cubic polynomial kernel, averaged over subsets), and
  `PixelMoments` / `pixel_moment_errors` (mean and covariance error in pixel
  space).
* `extract_features`: a jitted feature network run over a large array in
  fixed-size batches.
* `image_grid` (written by `flowdiff_jax.paths.write_image`).

The matrix square root of the Fréchet distance runs on the host in float64
(an eigendecomposition of the symmetric form): batched `jnp.linalg` inside jit
can deadlock XLA's CPU thread pool (README, Known problems), and float32 loses
the small differences FID is made of.

Images are float arrays in [-1, 1] unless a docstring says uint8.
"""

from __future__ import annotations

from collections.abc import Callable

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


# --------------------------------------------------------------------------
# Distances between image distributions, on features (host, float64).
# --------------------------------------------------------------------------


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(mean [D], covariance [D, D]) of features [N, D], in float64; covariance with N − 1."""
  f = np.asarray(features, np.float64)
  if f.ndim != 2 or len(f) < 2:
    raise ValueError(f"Need features [N >= 2, D], got shape {f.shape}.")
  return f.mean(axis=0), np.cov(f, rowvar=False).reshape(f.shape[1], f.shape[1])


def _sqrt_psd(a: np.ndarray) -> np.ndarray:
  """Symmetric square root of a symmetric PSD matrix (eigenvalues below 0 clipped: round-off)."""
  w, v = np.linalg.eigh((a + a.T) / 2)
  return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray,
                     sigma2: np.ndarray) -> float:
  """Fréchet (2-Wasserstein²) distance between N(mu1, sigma1) and N(mu2, sigma2).

      d² = ‖mu1 − mu2‖² + tr(sigma1) + tr(sigma2) − 2 tr((sigma1 sigma2)^½)

  with tr((Σ1 Σ2)^½) = tr((Σ1^½ Σ2 Σ1^½)^½): the eigenvalues of Σ1 Σ2 are those
  of the symmetric PSD Σ1^½ Σ2 Σ1^½, so two symmetric eigendecompositions
  give it, in float64, without the complex round-off of a general sqrtm.

  Args:
    mu1, mu2: means [D].
    sigma1, sigma2: covariances [D, D] (symmetric PSD; singular is fine).

  Returns:
    The distance (squared units of the features), >= 0 up to round-off.
  """
  mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
  sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
  if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
    raise ValueError(f"Shapes do not match: mu {mu1.shape}, {mu2.shape}; "
                     f"sigma {sigma1.shape}, {sigma2.shape}.")
  root1 = _sqrt_psd(sigma1)
  middle = root1 @ sigma2 @ root1
  eig = np.linalg.eigvalsh((middle + middle.T) / 2)
  tr_covmean = np.sum(np.sqrt(np.clip(eig, 0.0, None)))
  diff = mu1 - mu2
  return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean)


def frechet_distance_of_features(features1: np.ndarray, features2: np.ndarray) -> float:
  """Fréchet distance between Gaussians fitted to features [N1, D] and [N2, D]."""
  return frechet_distance(*feature_statistics(features1), *feature_statistics(features2))


def polynomial_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
  """KID's kernel k(x, y) = (xᵀy / D + 1)³ between rows of x [N, D] and y [M, D] -> [N, M]."""
  return (x @ y.T / x.shape[1] + 1.0) ** 3


def mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
  """The unbiased estimate of MMD² (Gretton et al. 2012, eq. 3) with `polynomial_kernel`.

      1/(m(m−1)) Σ_{i≠j} k(x_i, x_j) + 1/(n(n−1)) Σ_{i≠j} k(y_i, y_j)
        − 2/(mn) Σ_{i,j} k(x_i, y_j)

  for x [m, D], y [n, D] (m, n >= 2). Its expectation over independent draws
  is exactly MMD²(P, Q); it can be negative.
  """
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  m, n = len(x), len(y)
  if m < 2 or n < 2:
    raise ValueError(f"The unbiased MMD² needs at least 2 samples per set, got {m} and {n}.")
  kxx, kyy, kxy = polynomial_kernel(x, x), polynomial_kernel(y, y), polynomial_kernel(x, y)
  # The diagonal k(x_i, x_i) is left out: including it gives the biased V-statistic.
  xx = (kxx.sum() - np.trace(kxx)) / (m * (m - 1))
  yy = (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
  return float(xx + yy - 2.0 * kxy.mean())


def kid(features1: np.ndarray, features2: np.ndarray, *, num_subsets: int = 100,
        subset_size: int = 1000, seed: int = 0) -> tuple[float, float]:
  """Kernel Inception Distance (Bińkowski et al. 2018) between features [N1, D] and [N2, D].

  The unbiased MMD² (`mmd2_unbiased`) of `num_subsets` random subsets of
  `subset_size` rows of each set (drawn without replacement within a subset;
  min(subset_size, N1, N2) when a set is smaller), averaged.

  Returns:
    (mean, std) over the subsets: the KID and the spread of its subset estimates.
  """
  f1, f2 = np.asarray(features1, np.float64), np.asarray(features2, np.float64)
  size = min(subset_size, len(f1), len(f2))
  rng = np.random.default_rng(seed)
  estimates = [mmd2_unbiased(f1[rng.choice(len(f1), size, replace=False)],
                             f2[rng.choice(len(f2), size, replace=False)])
               for _ in range(num_subsets)]
  return float(np.mean(estimates)), float(np.std(estimates))


class PixelMoments:
  """Streaming mean and covariance of images [B, H, W, C] over pixels, in float64.

  `pool` > 1 averages pool x pool blocks first: the covariance has
  (H W C / pool²)² entries, which at 64x64x3 would be 1.2 GB.
  """

  def __init__(self, pool: int = 1):
    self.pool, self.count, self._sum, self._outer = pool, 0, None, None

  def add(self, images: np.ndarray) -> None:
    x = np.asarray(images, np.float64)
    if self.pool > 1:
      b, h, w, c = x.shape
      x = x.reshape(b, h // self.pool, self.pool, w // self.pool, self.pool, c).mean((2, 4))
    x = x.reshape(len(x), -1)
    if self._sum is None:
      self._sum, self._outer = np.zeros(x.shape[1]), np.zeros((x.shape[1],) * 2)
    self.count += len(x)
    self._sum += x.sum(0)
    self._outer += x.T @ x

  def mean(self) -> np.ndarray:
    return self._sum / self.count

  def covariance(self) -> np.ndarray:
    mean = self.mean()
    return (self._outer - self.count * np.outer(mean, mean)) / (self.count - 1)


def pixel_pool_for(image_shape: tuple[int, int, int], max_dim: int = 4096) -> int:
  """The smallest power-of-2 pooling that keeps H W C / pool² <= max_dim (and divides H, W)."""
  h, w, c = image_shape
  pool = 1
  while h * w * c // pool ** 2 > max_dim and h % (2 * pool) == 0 and w % (2 * pool) == 0:
    pool *= 2
  return pool


def pixel_moment_errors(samples: PixelMoments, reference: PixelMoments) -> dict[str, float]:
  """How far the samples' pixel mean and covariance are from the reference's.

  Returns:
    {"pixel_mean_rmse": ‖μ_s − μ_r‖ / sqrt(D) (root mean square over pixels, [-1, 1] units),
     "pixel_cov_rel_error": ‖Σ_s − Σ_r‖_F / ‖Σ_r‖_F}.
  """
  diff = samples.mean() - reference.mean()
  cov_ref = reference.covariance()
  return {"pixel_mean_rmse": float(np.sqrt(np.mean(diff ** 2))),
          "pixel_cov_rel_error": float(np.linalg.norm(samples.covariance() - cov_ref)
                                       / np.linalg.norm(cov_ref))}


def extract_features(feature_fn: Callable[[jax.Array], jax.Array], images: np.ndarray,
                     batch_size: int) -> np.ndarray:
  """feature_fn over images [N, H, W, C] in batches of exactly batch_size -> features [N, D] (host).

  The last batch is padded (with its own first image) so that the jitted
  feature_fn compiles once.
  """
  out = []
  for start in range(0, len(images), batch_size):
    batch = np.asarray(images[start:start + batch_size])
    n = len(batch)
    if n < batch_size:
      batch = np.concatenate([batch, np.repeat(batch[:1], batch_size - n, axis=0)])
    out.append(np.asarray(jax.device_get(feature_fn(batch)))[:n])
  return np.concatenate(out).astype(np.float64)


def quantize(images: np.ndarray | jax.Array) -> np.ndarray:
  """[-1, 1] floats -> the nearest of the 256 uint8 levels, back in [-1, 1] (float32).

  Generated samples are evaluated as the 8-bit images they would be saved as,
  like the clean images they are compared with.
  """
  levels = np.clip(np.round((np.asarray(images, np.float32) + 1.0) * 127.5), 0, 255)
  return (levels / 127.5 - 1.0).astype(np.float32)


# --------------------------------------------------------------------------
# Figures.
# --------------------------------------------------------------------------


def image_grid(images: np.ndarray, num_cols: int | None = None, pad: int = 1) -> np.ndarray:
  """Tiles uint8 images [N, H, W, C] into one uint8 image.

  The result is [rows*(H+pad)+pad, cols*(W+pad)+pad, C].
  """
  n, h, w, c = images.shape
  cols = num_cols or int(np.ceil(np.sqrt(n)))
  rows = int(np.ceil(n / cols))
  grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), 255, np.uint8)
  for i, image in enumerate(images):
    r, q = divmod(i, cols)
    top, left = pad + r * (h + pad), pad + q * (w + pad)
    grid[top:top + h, left:left + w] = image
  return grid


