"""The exact epsilon prediction of Gaussian data, as a trainable score network.

For x ~ N(mu, Sigma) the VP marginal is x_t ~ N(alpha_t mu, C_t) with
C_t = alpha_t^2 Sigma + sigma_t^2 I, and the optimal epsilon prediction is

    eps_hat(x_t, t) = -sigma_t grad log p_t(x_t) = sigma_t C_t^-1 (x_t - alpha_t mu).

`GaussianScore` learns mu and Sigma, so its family contains the true score of
Gaussian data (docs/design.md §2.8): the oracle for tests and experiments on that
problem. It does one D x D eigendecomposition per call (D = H*W*C; every t of
the batch shares it), so D must be moderate (16x16 images are fine).
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


@jax.custom_vjp
def resolvent_solve(cov: jax.Array, alpha: jax.Array, sigma: jax.Array,
                    r: jax.Array) -> jax.Array:
  """(α_b² Σ + σ_b² I)⁻¹ r_b for every example b: cov Σ [D, D] (symmetric PSD),
  alpha, sigma [B], r [B, D] -> [B, D].

  One eigendecomposition Σ = U diag(λ) Uᵀ serves every t in the batch:
  C_b⁻¹ = U diag(1 / (α_b² λ + σ_b²)) Uᵀ, so a step costs one D×D eigh and
  two [B, D] × [D, D] products instead of a D×D Cholesky per example (which
  made D = 256, 16×16 images, impractical). The gradient is not taken through
  the eigenvectors (ill-defined where eigenvalues repeat, as at the init
  Σ = I) but from the resolvent's own derivative, d(C⁻¹) = −C⁻¹ dC C⁻¹:
  with v = C⁻¹ r and w = C⁻¹ g for the cotangent g,
    ∂Σ = −Σ_b α_b² (w_b v_bᵀ + v_b w_bᵀ) / 2,  ∂r = w,
    ∂α_b = −2 α_b w_bᵀ Σ v_b,  ∂σ_b = −2 σ_b w_bᵀ v_b.
  """
  return _resolvent_fwd(cov, alpha, sigma, r)[0]


def _apply_inverse(lam, vec, alpha, sigma, r):
  """C_b⁻¹ r_b from Σ's eigenpairs (λ [D], U [D, D])."""
  inv = 1.0 / ((alpha**2)[:, None] * lam[None, :] + (sigma**2)[:, None])
  return jnp.matmul(inv * jnp.matmul(r, vec, precision=_PRECISION), vec.T, precision=_PRECISION)


def _resolvent_fwd(cov, alpha, sigma, r):
  # The eigenvalues of a PSD matrix; float32 rounding can make the smallest
  # slightly negative, which C_t's σ² I then dominates.
  lam, vec = jnp.linalg.eigh(cov)
  lam = jnp.maximum(lam, 0.0)
  v = _apply_inverse(lam, vec, alpha, sigma, r)
  return v, (cov, lam, vec, alpha, sigma, v)


def _resolvent_bwd(res, g):
  cov, lam, vec, alpha, sigma, v = res
  w = _apply_inverse(lam, vec, alpha, sigma, g)
  wa = w * (alpha**2)[:, None]
  d_cov = -0.5 * (jnp.matmul(wa.T, v, precision=_PRECISION)
                  + jnp.matmul(v.T, wa, precision=_PRECISION))
  cov_v = jnp.matmul(v, cov, precision=_PRECISION)  # Σ is symmetric: (Σ v_b) as rows
  d_alpha = -2.0 * alpha * jnp.sum(w * cov_v, axis=-1)
  d_sigma = -2.0 * sigma * jnp.sum(w * v, axis=-1)
  return d_cov, d_alpha, d_sigma, w


resolvent_solve.defvjp(_resolvent_fwd, _resolvent_bwd)


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
    resid = x_t.reshape(batch, dims).astype(jnp.float32) - alpha[:, None] * mean.reshape(1, dims)
    eps_hat = sigma[:, None] * resolvent_solve(cov, alpha, sigma, resid)
    return eps_hat.reshape(x_t.shape).astype(x_t.dtype)
