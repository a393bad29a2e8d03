"""The exact epsilon prediction of Gaussian data, as a trainable score network.

For x ~ N(mu, Sigma) the VP marginal is x_t ~ N(alpha_t mu, C_t) with
C_t = alpha_t^2 Sigma + sigma_t^2 I, and the optimal epsilon prediction is

    eps_hat(x_t, t) = -sigma_t grad log p_t(x_t) = sigma_t C_t^-1 (x_t - alpha_t mu).

`GaussianScore` learns mu and Sigma, so its family contains the true score of
Gaussian data (docs/design.md §2.8): the oracle for tests and experiments on that
problem. It does a D x D Cholesky per example (D = H*W*C), so D must be small.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from flowdiff_jax import diffusion

# L L^T and the solves in full float32 even where the accelerator's default
# matmul is TF32/bf16: C_t is ill-conditioned near t_min.
_PRECISION = jax.lax.Precision.HIGHEST


def _scale_tril(raw: jax.Array) -> jax.Array:
  """Cholesky factor L [D, D] of Sigma: the strict lower part of raw, exp of its diagonal."""
  return jnp.tril(raw, -1) + jnp.diag(jnp.exp(jnp.diag(raw)))


def _unwrap(params: Any) -> Any:
  return params["params"] if "params" in params else params


def mean_and_covariance(params: Any) -> tuple[jax.Array, jax.Array]:
  """(mu [H, W, C], Sigma [D, D]) of a GaussianScore's params (or its variables dict)."""
  params = _unwrap(params)
  tril = _scale_tril(params["scale_tril_raw"])
  return params["mean"], jnp.matmul(tril, tril.T, precision=_PRECISION)


def params_from_mean_and_covariance(mean: jax.Array, covariance: jax.Array) -> dict:
  """GaussianScore params {"mean", "scale_tril_raw"} for N(mean [H, W, C], covariance [D, D])."""
  tril = jnp.linalg.cholesky(jnp.asarray(covariance, jnp.float32))
  raw = jnp.tril(tril, -1) + jnp.diag(jnp.log(jnp.diag(tril)))
  return {"mean": jnp.asarray(mean, jnp.float32), "scale_tril_raw": raw}


def _spd_solve(a: jax.Array, b: jax.Array) -> jax.Array:
  """A⁻¹ b for SPD A [B, D, D] and b [B, D], by Cholesky in plain JAX ops.

  Not jnp.linalg.cholesky: jaxlib's batched LAPACK kernels split the batch
  over XLA's intra-op thread pool and wait for it from inside that pool; with
  several such ops in flight on a 2-thread pool (two devices, or two
  concurrent thunks) every thread waits and the program deadlocks (seen with
  jaxlib 0.10.2). D is small here, so column-by-column loops cost nothing.
  """
  d = a.shape[-1]
  idx = jnp.arange(d)

  def column(j, low):
    row = low[:, j, :]                                   # L[j, :j] (zeros beyond)
    diag = jnp.sqrt(a[:, j, j] - jnp.sum(row * row, axis=-1))
    col = (a[:, :, j] - jnp.einsum("bik,bk->bi", low, row)) / diag[:, None]
    col = jnp.where(idx > j, col, jnp.where(idx == j, diag[:, None], 0.0))
    return low.at[:, :, j].set(col)

  low = jax.lax.fori_loop(0, d, column, jnp.zeros_like(a))

  def forward(j, y):   # L y = b
    y_j = (b[:, j] - jnp.sum(low[:, j, :] * y, axis=-1)) / low[:, j, j]
    return y.at[:, j].set(y_j)

  def backward(i, x):  # Lᵀ x = y, from the last row up
    j = d - 1 - i
    x_j = (y[:, j] - jnp.sum(low[:, :, j] * x, axis=-1)) / low[:, j, j]
    return x.at[:, j].set(x_j)

  y = jax.lax.fori_loop(0, d, forward, jnp.zeros_like(b))
  return jax.lax.fori_loop(0, d, backward, jnp.zeros_like(b))


class GaussianScore(nn.Module):
  """eps_hat of N(mu, Sigma) data: (x_t [B,H,W,C], t [B] in [0,1]) -> eps_hat [B,H,W,C].

  Params: "mean" [H, W, C] (init 0) and "scale_tril_raw" [D, D], D = H*W*C,
  the log-Cholesky parametrisation of Sigma = L L^T: L's strictly lower part
  is raw's, its diagonal exp(diag(raw)) (positive, so L is the Cholesky
  factor, smooth and unconstrained); raw's upper part is unused. Init:
  raw = log(init_scale) I, i.e. L = init_scale I (Sigma = init_scale^2 I).
  ``train`` is ignored (no dropout); it is there so the module is called
  like the U-Net.
  """
  schedule: diffusion.VPSchedule
  init_scale: float = 1.0  # initial std of every pixel (Sigma = init_scale^2 I)

  @nn.compact
  def __call__(self, x_t: jax.Array, t: jax.Array, *, train: bool = False) -> jax.Array:
    del train
    if x_t.ndim != 4:
      raise ValueError(f"GaussianScore expects x_t of shape [B,H,W,C], got {x_t.shape}")
    if not self.init_scale > 0:
      raise ValueError(f"GaussianScore.init_scale must be > 0, got {self.init_scale}")
    batch, image_shape = x_t.shape[0], x_t.shape[1:]
    dims = math.prod(image_shape)
    mean = self.param("mean", nn.initializers.zeros_init(), image_shape, jnp.float32)
    raw = self.param("scale_tril_raw",
                     lambda rng: math.log(self.init_scale) * jnp.eye(dims, dtype=jnp.float32))
    _, cov = mean_and_covariance({"mean": mean, "scale_tril_raw": raw})

    t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (batch,))
    alpha, sigma = self.schedule.alpha_sigma(t)
    c_t = (alpha**2)[:, None, None] * cov + (sigma**2)[:, None, None] * jnp.eye(dims)
    resid = x_t.reshape(batch, dims).astype(jnp.float32) - alpha[:, None] * mean.reshape(1, dims)
    eps_hat = sigma[:, None] * _spd_solve(c_t, resid)
    return eps_hat.reshape(x_t.shape).astype(x_t.dtype)
