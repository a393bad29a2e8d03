r"""A Gaussian prior N(μ, Σ) fitted to corrupted observations alone, by exact EM.

The data are y_i = A_i x_i + σ_y ε_i with x_i ~ N(μ, Σ), one operator A_i = A_{ω_i}
of `flowdiff_jax.operators` per example; the clean x_i are never seen. Every
expectation below is exact: the posterior p(x | y_i) of a Gaussian prior under a
linear-Gaussian observation is Gaussian,

  P_i = (Σ⁻¹ + A_iᵀA_i / σ_y²)⁻¹,   m_i = μ + Σ A_iᵀ S_i⁻¹ (y_i − A_i μ),
  S_i = A_i Σ A_iᵀ + σ_y² I,         P_i = Σ − Σ A_iᵀ S_i⁻¹ A_i Σ,

and the marginal of the observation is y_i ~ N(A_i μ, S_i). EM alternates
  E: (m_i, P_i) under the current (μ, Σ);
  M: μ ← mean_i m_i,  Σ ← mean_i [P_i + (m_i − μ)(m_i − μ)ᵀ],
and never decreases L(μ, Σ) = Σ_i log N(y_i; A_i μ, S_i), which `fit` records
every iteration (`GaussianFit.loglik`).

Conventions
-----------
* Images are float32 [N, H, W, C] (the operators' convention); internally
  vectors are flattened row-major, D = H·W·C.
* Unmeasured coordinates. A masking operator observes y = mask ⊙ (x + σ_y ε):
  a dropped pixel is an exact 0 carrying no information. Rows of A_i that are
  zero are "unmeasured": they are left out of the likelihood (L counts only
  measured coordinates), which is the same as solving with the observed
  sub-block of S_i. In code S_i gets a 1 (not σ_y²) on those diagonal entries,
  which decouples them exactly and keeps the matrix well conditioned.
* Initialisation (the wide start of Rozet et al. 2024, "Learning diffusion
  priors from observations by expectation maximization"): μ₀ = mean_i A_i⁺ y_i
  (`init_mean="pinv"`) or 0 (`"zero"`); Σ₀ = init_var · I (dense), or for the
  low-rank family U₀ = √init_var · Q with Q a random orthonormal [D, r] (a
  factor must start non-zero: U = 0 is a fixed point of its EM) and
  d₀ = init_var, i.e. Σ₀ = init_var (I + QQᵀ).

Two parameterisations of Σ
--------------------------
Dense (``rank=None``; the Gaussian oracle, D up to a few hundred). Σ is a full
[D, D] matrix and the E and M steps above are done as written, P_i in the
Joseph form (I − K A) Σ (I − K A)ᵀ + σ_y² K Kᵀ, which stays symmetric PSD in
float32.

Low rank plus diagonal (``rank=r``; Fashion-MNIST, CIFAR). Σ = U Uᵀ + diag(d),
U [D, r], d [D] ≥ 0: the factor-analysis model x = μ + U z + e, z ~ N(0, I_r),
e ~ N(0, diag d). We run the *exact* EM of that model with both z and x
latent (Tipping & Bishop's PPCA/FA EM, with the per-example operator between
x and the data). The E-step needs, per example, the joint Gaussian posterior
of (z, x): E[z], Cov[z], E[x], Cov[x, z] and diag Cov[x]. Writing w = (z, 1)
and W = [U, μ], the M-step is the FA regression of x on w,

  W ← E[x wᵀ] E[w wᵀ]⁻¹,   d ← diag E[x xᵀ] − rowsum(W ⊙ E[x wᵀ]),

with expectations averaged over examples. Being an exact EM of a latent
variable model it has EM's guarantee too: L never decreases within the
low-rank family. The E-step is organised by operator:

* Per-example diagonal operators (random / box masks; denoising when omega is
  given per example): A_i = diag(a_i), a_i = A_i 𝟙 = op.apply(ones). Given z
  the pixels are independent, so everything is elementwise plus one r×r
  system per example (Woodbury / the matrix determinant lemma):
    w_j = 1/(a_j² d_j + σ_y²) on measured pixels, 0 elsewhere,
    Cov[z | y]⁻¹ = I + Uᵀ diag(a² w) U,   E[z | y] = Cov[z | y] Uᵀ (a w (y − a μ)),
    x_j | z, y: mean s_j (μ_j + u_jᵀ z) + a_j d_j w_j y_j, var d_j s_j,
    s_j = σ_y² w_j (1 where unmeasured).
  No 1/d appears, so d → 0 (e.g. Fashion-MNIST's constant border) is harmless.
  Cost O(D r²) per example; batched with vmap, chunked with lax.scan, and
  sharded over the examples (shard_map over a 1-D "data" mesh, psum of the
  sufficient statistics).
* Operators shared by all examples (omega = {}: denoising, the circular
  blur): S is the same for every example and every posterior mean is affine
  in y_i, so all the E-step sums are functions of the observations' mean ȳ and
  covariance C_y, computed once (one sharded pass over the data). Each
  iteration is then a few D×D products and one D×D Cholesky, independent of
  N — exact, and cheap up to D ≈ 4000 (CIFAR: 3072). The dense Σ = UUᵀ +
  diag(d) is formed for it; the low-rank constraint enters only in the M-step.
  The same route serves the dense parameterisation.

Public API: `fit`, `GaussianFit`, `posterior_mean`, `posterior_sample`,
`sample`, `log_likelihood`, `posterior_moments` (dense, small D),
`operator_matrix`, the closed-form reference `denoise_mle`, and the jittable
restorer of the flow methods' warm start (`restorer`, `restore`,
`restorer_shapes`), and the fit as arrays for the EM method's warm start
(`prior_params`, `prior_from_params`, `prior_shapes`), and its log-density as
the flow's prior term of flowdiff's hand-over (`log_density_params`,
`log_density`, `log_density_shapes`).
"""

from __future__ import annotations

from collections.abc import Callable
import functools
import math
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
import numpy as np

from flowdiff_jax import operators

Omega = dict[str, jax.Array]
Params = dict[str, jax.Array]

_LOG_2PI = math.log(2.0 * math.pi)
# Operators whose A_ω is diagonal (A = diag(A 𝟙)); the low-rank per-example
# E-step relies on it.
_DIAGONAL = (operators.Denoise, operators.RandomInpaint, operators.BoxInpaint)


@flax.struct.dataclass
class GaussianFit:
  """A fitted Gaussian prior N(mean, Σ) on images.

  Attributes:
    mean: [H, W, C].
    cov: [D, D] (dense fits), else None.
    factor: [D, r] and diag: [D] (low-rank fits, Σ = factor factorᵀ + diag(diag)), else None.
    loglik: float64 [T + 1], the summed observation log-likelihood
      Σ_i log N(y_i; A_i μ, S_i) of the parameters after 0, 1, ..., T EM
      iterations (measured coordinates only); None if not computed.
  """

  mean: jax.Array
  cov: jax.Array | None = None
  factor: jax.Array | None = None
  diag: jax.Array | None = None
  loglik: np.ndarray | None = None

  @property
  def image_shape(self) -> tuple[int, ...]:
    return tuple(self.mean.shape)

  @property
  def rank(self) -> int | None:
    """r for low-rank fits, None for dense ones."""
    return None if self.factor is None else self.factor.shape[1]

  def covariance(self) -> jax.Array:
    """Σ as a dense [D, D] matrix (materialises a low-rank fit)."""
    return _dense_cov(_params(self))


# --------------------------------------------------------------------------
# Small helpers: flattening, parameters, operators as matrices.
# --------------------------------------------------------------------------


def _params(fit_: GaussianFit) -> Params:
  mu = jnp.reshape(fit_.mean, (-1,))
  if fit_.cov is not None:
    return {"mu": mu, "cov": fit_.cov}
  return {"mu": mu, "factor": fit_.factor, "diag": fit_.diag}


def _to_fit(params: Params, image_shape, loglik=None) -> GaussianFit:
  return GaussianFit(mean=params["mu"].reshape(image_shape), cov=params.get("cov"),
                     factor=params.get("factor"), diag=params.get("diag"), loglik=loglik)


def _dense_cov(params: Params) -> jax.Array:
  if "cov" in params:
    return params["cov"]
  u = params["factor"]
  return u @ u.T + jnp.diag(params["diag"])


def _symmetrize(a: jax.Array) -> jax.Array:
  return 0.5 * (a + a.T)


def _is_shared(omega: Omega) -> bool:
  """Operators without per-example parameters act identically on every example."""
  return not jax.tree.leaves(omega)


def _one(tree):
  """An unbatched pytree as a batch of one."""
  return jax.tree.map(lambda a: a[None], tree)


def _example_matrix(op: operators.Operator, omega_i: Omega, image_shape) -> jax.Array:
  """A_ω of one example as a matrix [D, D] (rows: measured coordinates), from op.apply on
  the identity basis; omega_i unbatched."""
  d = math.prod(image_shape)
  basis = jnp.eye(d, dtype=jnp.float32).reshape((d,) + tuple(image_shape))
  om = jax.tree.map(lambda a: jnp.broadcast_to(a, (d,) + a.shape), omega_i)
  # Row j of the output is A e_j, i.e. column j of A.
  return op.apply(basis, om).reshape(d, d).T


def operator_matrix(op: operators.Operator, image_shape, omega: Omega | None = None
                    ) -> jax.Array:
  """The operator as an explicit matrix: [D, D] if omega is None or {}, else [N, D, D]
  for batched omega (leaves [N, ...]). For small D (tests, the dense path)."""
  if omega is None or _is_shared(omega):
    return _example_matrix(op, {}, image_shape)
  return jax.vmap(lambda om: _example_matrix(op, om, image_shape))(omega)


def _diagonal_entries(op: operators.Operator, omega_i: Omega, image_shape) -> jax.Array:
  """a = A 𝟙 [D]: the diagonal of a diagonal operator (one example, omega_i unbatched)."""
  ones = jnp.ones((1,) + tuple(image_shape), jnp.float32)
  return op.apply(ones, _one(omega_i))[0].reshape(-1)


def _check_operator(op: operators.Operator) -> float:
  if not op.sigma_y > 0:
    raise ValueError(f"gaussian_em needs sigma_y > 0 (the likelihood is degenerate), "
                     f"got {op.sigma_y!r}")
  return float(op.sigma_y) ** 2


# --------------------------------------------------------------------------
# SPD inverses for batches of small systems.
# --------------------------------------------------------------------------


def _spd_inverse(a: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(A⁻¹, log det A) of a symmetric positive-definite [n, n] matrix, vmap-friendly.

  Gauss–Jordan elimination without pivoting (safe for SPD: every pivot is a
  Schur complement, hence > 0; their product is det A). Under vmap this is n
  rank-one updates vectorised over the batch; XLA:CPU's batched triangular
  solves and inverses (cho_solve, inv) are 30–100× slower on [256, 32, 32].
  """
  n = a.shape[-1]
  idx = jnp.arange(n)

  def body(k, carry):
    a, logdet = carry
    e = (idx == k).astype(a.dtype)
    p = a[k, k]
    col = a[:, k] * (1.0 - e)
    row = (a[k, :] * (1.0 - e) + e) / p
    a = a * (1.0 - e)[None, :] - col[:, None] * row[None, :]
    a = a * (1.0 - e)[:, None] + e[:, None] * row[None, :]
    return a, logdet + jnp.log(p)

  # zeros_like(a[0, 0]), not zeros(()): under shard_map the carry must be varying like a.
  inv, logdet = jax.lax.fori_loop(0, n, body, (a, jnp.zeros_like(a[0, 0])))
  return _symmetrize(inv), logdet


# --------------------------------------------------------------------------
# Exact Gaussian conditioning, dense Σ.
# --------------------------------------------------------------------------


def _obs_cov(cov: jax.Array, a_mat: jax.Array, measured: jax.Array, sigma2: float):
  """(S, AΣ): S = AΣAᵀ + σ_y² I [M, M], with 1 (not σ_y²) on unmeasured rows.

  cov: Σ [D, D]; a_mat: A [M, D], zero rows where unmeasured; measured: bool [M].
  The unit diagonal decouples the unmeasured rows exactly (their rows of AΣ are 0).
  """
  m = measured.astype(cov.dtype)
  a_cov = a_mat @ cov
  return _symmetrize(a_cov @ a_mat.T) + jnp.diag(sigma2 * m + (1.0 - m)), a_cov


def _gain_post(cov, a_mat, s_inv_a_cov, sigma2):
  """Gain K = Σ Aᵀ S⁻¹ [D, M] (zero columns on unmeasured rows) and P [D, D] in the
  Joseph form (I − KA) Σ (I − KA)ᵀ + σ_y² K Kᵀ, which stays PSD in float32."""
  gain = s_inv_a_cov.T
  i_ka = jnp.eye(cov.shape[0], dtype=cov.dtype) - gain @ a_mat
  post = i_ka @ cov @ i_ka.T + sigma2 * (gain @ gain.T)
  return gain, _symmetrize(post)


def _shared_condition(cov, a_mat, measured, sigma2):
  """The same conditioning for one operator shared by all examples (unbatched, so
  LAPACK's Cholesky is fast): (chol [M, M] of S, log det S, gain K, P)."""
  s, a_cov = _obs_cov(cov, a_mat, measured, sigma2)
  chol = jnp.linalg.cholesky(s)
  gain, post = _gain_post(cov, a_mat, jax.scipy.linalg.cho_solve((chol, True), a_cov), sigma2)
  return chol, 2.0 * jnp.sum(jnp.log(jnp.diagonal(chol))), gain, post


def _gaussian_loglik(logdet: jax.Array, quad: jax.Array, num_measured: jax.Array) -> jax.Array:
  """log N(r; 0, S) from log det S, rᵀS⁻¹r and the number of measured coordinates."""
  return -0.5 * (num_measured * _LOG_2PI + logdet + quad)


def _dense_example(mu, cov, y, a_mat, sigma2):
  """One example, dense Σ: y [M], a_mat [M, D]. Returns the centred posterior mean
  m − μ [D], P [D, D] and log N(y; Aμ, S) (measured coordinates)."""
  measured = jnp.any(a_mat != 0, axis=1)
  s, a_cov = _obs_cov(cov, a_mat, measured, sigma2)
  s_inv, logdet = _spd_inverse(s)
  gain, post = _gain_post(cov, a_mat, s_inv @ a_cov, sigma2)
  resid = jnp.where(measured, y - a_mat @ mu, 0.0)
  ll = _gaussian_loglik(logdet, resid @ s_inv @ resid, jnp.sum(measured))
  return gain @ resid, post, ll


# --------------------------------------------------------------------------
# Exact posterior of the factor model x = μ + U z + e under diagonal operators.
# --------------------------------------------------------------------------


def _factor_posterior(mu, factor, diag, y, a, sigma2):
  """Joint posterior of (z, x) for a batch of examples, A_i = diag(a_i).

  Args:
    mu [D], factor U [D, r], diag d [D]; y [B, D] the observations; a [B, D]
    the operators' diagonals (0 = unmeasured).
  Returns:
    dict z_mean [B, r], z_cov [B, r, r], x_mean [B, D], x_var [B, D]
    (diag Cov[x | y]), s [B, D] and uc [D, B, r] with Cov[x, z | y] =
    s ⊙ uc (row-wise), loglik [B] (log N(y; Aμ, AΣAᵀ + σ_y² I), measured
    coordinates).
  Written with explicit GEMMs over the batch (not vmap): the shared U then
  enters single large matrix products.
  """
  b, r = y.shape[0], factor.shape[1]
  measured = a != 0
  w = jnp.where(measured, 1.0 / (jnp.square(a) * diag + sigma2), 0.0)
  resid = jnp.where(measured, y - a * mu, 0.0)
  # Given z the measured pixels are independent with variance a²d + σ_y², so the
  # posterior precision of z is I + Uᵀ diag(a² w) U (Woodbury), an r×r system:
  # one [B, D] × [D, r²] product against the pixels' outer products u_j u_jᵀ.
  outer = (factor[:, :, None] * factor[:, None, :]).reshape(-1, r * r)
  prec = jnp.eye(r, dtype=y.dtype) + ((jnp.square(a) * w) @ outer).reshape(b, r, r)
  h = (a * w * resid) @ factor
  z_cov, logdet_z = jax.vmap(_spd_inverse)(prec)
  z_mean = jnp.einsum("bkl,bl->bk", z_cov, h)
  # x_j | z, y shrinks the prior mean μ_j + u_jᵀz towards the datum by s_j.
  s = jnp.where(measured, sigma2 * w, 1.0)
  x_mean = s * (mu + z_mean @ factor.T) + a * diag * w * y
  uc = (factor @ jnp.moveaxis(z_cov, 0, 1).reshape(r, b * r)).reshape(-1, b, r)
  x_var = diag * s + jnp.square(s) * jnp.einsum("jbk,jk->bj", uc, factor)
  # Matrix determinant lemma and Woodbury for log N(y_O; a μ, diag(a) U Uᵀ diag(a) + 1/w).
  logdet = -jnp.sum(jnp.where(measured, jnp.log(jnp.where(measured, w, 1.0)), 0.0), axis=1)
  quad = jnp.sum(w * jnp.square(resid), axis=1) - jnp.sum(h * z_mean, axis=1)
  ll = _gaussian_loglik(logdet + logdet_z, quad, jnp.sum(measured, axis=1))
  return dict(z_mean=z_mean, z_cov=z_cov, x_mean=x_mean, x_var=x_var, s=s, uc=uc, loglik=ll)


# --------------------------------------------------------------------------
# M-steps (from expectations averaged over examples, centred at the old μ).
# --------------------------------------------------------------------------


def _dense_mstep(mu, e_x, e_xx, e_p):
  """e_x = mean (m − μ) [D]; e_xx = mean (m − μ)(m − μ)ᵀ; e_p = mean P_i."""
  cov = e_p + e_xx - jnp.outer(e_x, e_x)
  return {"mu": mu + e_x, "cov": _symmetrize(cov)}


def _factor_mstep(mu, e: dict, min_var: float) -> Params:
  """FA regression of x̃ = x − μ_old on w = (z, 1).

  e: z [r], zz [r, r] = E[zzᵀ], x [D] = E[x̃], xz [D, r] = E[x̃ zᵀ], xx [D] = diag E[x̃x̃ᵀ]
  (each averaged over examples). Centring at μ_old keeps the float32 sums of
  second moments small (pixel means are O(1), variances can be 1e-3).
  """
  r = e["zz"].shape[0]
  eww = jnp.block([[e["zz"], e["z"][:, None]], [e["z"][None, :], jnp.ones((1, 1))]])
  exw = jnp.concatenate([e["xz"], e["x"][:, None]], axis=1)
  w = jnp.linalg.solve(_symmetrize(eww), exw.T).T
  d = e["xx"] - jnp.sum(w * exw, axis=1)
  return {"mu": mu + w[:, r], "factor": w[:, :r], "diag": jnp.maximum(d, min_var)}


# --------------------------------------------------------------------------
# Shared operators: everything through (ȳ, C_y).
# --------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("min_var",))
def _shared_step(params: Params, moments: dict, a_mat, measured, sigma2, *, min_var: float):
  """One EM iteration for an operator shared by all examples.

  moments: mean ȳ [M] and cov C_y [M, M] (1/N) of the observations. With
  r_i = y_i − Aμ, every posterior mean is m_i = μ + K r_i, so the averages the
  M-step needs are quadratic forms in r̄ and R₂ = C_y + r̄ r̄ᵀ.
  Returns (new params, mean log-likelihood per example of the old ones).
  """
  mu = params["mu"]
  m = measured.astype(mu.dtype)
  chol, logdet, gain, post = _shared_condition(_dense_cov(params), a_mat, measured, sigma2)
  rbar = m * (moments["mean"] - a_mat @ mu)
  c_y = moments["cov"] * jnp.outer(m, m)
  r2 = c_y + jnp.outer(rbar, rbar)
  quad = jnp.trace(jax.scipy.linalg.cho_solve((chol, True), r2))
  ll = _gaussian_loglik(logdet, quad, jnp.sum(m))
  delta = gain @ rbar
  if "cov" in params:
    # mean (m_i − μ_new)(m_i − μ_new)ᵀ = K C_y Kᵀ.
    return {"mu": mu + delta, "cov": _symmetrize(post + gain @ c_y @ gain.T)}, ll
  u = params["factor"]
  au = a_mat @ u
  s_au = jax.scipy.linalg.cho_solve((chol, True), au)  # S⁻¹ A U [M, r]; E[z | y_i] = s_auᵀ r_i
  k_r2 = gain @ r2
  e = dict(z=s_au.T @ rbar,
           zz=s_au.T @ r2 @ s_au + jnp.eye(u.shape[1]) - au.T @ s_au,
           x=delta,
           xz=k_r2 @ s_au + u - gain @ au,  # Cov[x, z | y] = (I − KA) U
           xx=jnp.sum(k_r2 * gain, axis=1) + jnp.diagonal(post))
  return _factor_mstep(mu, e, min_var), ll


# --------------------------------------------------------------------------
# Per-example operators: sums over chunks of examples, sharded over devices.
# --------------------------------------------------------------------------


def _map_reduce(fn: Callable, params, data, weight, *, batch_size: int, mesh):
  """Sums fn over the examples and collects its per-example output.

  fn(params, chunk, weight_chunk) -> (sums pytree, per-example [B]). data has
  leaves [N, ...], weight [N] (0 on padding); N is a multiple of batch_size ×
  devices. With a mesh each device scans its own shard and the sums are
  psum'd over "data". Returns (sums, per-example [N]).
  """

  def local(params, data, weight):
    n = weight.shape[0]
    chunks = jax.tree.map(lambda a: a.reshape((n // batch_size, batch_size) + a.shape[1:]),
                          (data, weight))
    # The first chunk seeds the carry, so the carry has fn's own output types.
    sums, first = fn(params, *jax.tree.map(lambda a: a[0], chunks))

    def body(carry, chunk):
      s, ex = fn(params, *chunk)
      return jax.tree.map(jnp.add, carry, s), ex

    sums, rest = jax.lax.scan(body, sums, jax.tree.map(lambda a: a[1:], chunks))
    return sums, jnp.concatenate([first[None], rest], axis=0).reshape(n)

  if mesh is None:
    return local(params, data, weight)

  def sharded(params, data, weight):
    sums, ex = local(params, data, weight)
    return jax.lax.psum(sums, "data"), ex

  return jax.shard_map(sharded, mesh=mesh, in_specs=(P(), P("data"), P("data")),
                       out_specs=(P(), P("data")))(params, data, weight)


def _dense_stats(params, chunk, weight, *, op, image_shape, sigma2):
  y = chunk["y"].reshape(weight.shape[0], -1)
  a_mats = jax.vmap(lambda om: _example_matrix(op, om, image_shape))(chunk["omega"])
  dm, post, ll = jax.vmap(_dense_example, in_axes=(None, None, 0, 0, None))(
      params["mu"], params["cov"], y, a_mats, sigma2)
  sums = dict(n=jnp.sum(weight), x=weight @ dm,
              xx=jnp.einsum("b,bi,bj->ij", weight, dm, dm),
              p=jnp.einsum("b,bij->ij", weight, post))
  return sums, ll


def _factor_stats(params, chunk, weight, *, op, image_shape, sigma2):
  y = chunk["y"].reshape(weight.shape[0], -1)
  a = jax.vmap(lambda om: _diagonal_entries(op, om, image_shape))(chunk["omega"])
  post = _factor_posterior(params["mu"], params["factor"], params["diag"], y, a, sigma2)
  zm, dx = post["z_mean"], post["x_mean"] - params["mu"]
  sums = dict(n=jnp.sum(weight),
              z=weight @ zm,
              zz=jnp.einsum("b,bkl->kl", weight, post["z_cov"])
              + jnp.einsum("b,bk,bl->kl", weight, zm, zm),
              x=weight @ dx,
              xz=jnp.einsum("bj,jbk->jk", weight[:, None] * post["s"], post["uc"])
              + jnp.einsum("b,bj,bk->jk", weight, dx, zm),
              xx=weight @ (jnp.square(dx) + post["x_var"]))
  return sums, post["loglik"]


@functools.partial(jax.jit, static_argnames=("op", "image_shape", "batch_size", "mesh",
                                             "min_var"))
def _example_step(params, data, weight, *, op, image_shape, batch_size, mesh, min_var):
  """One EM iteration for per-example operators. Returns (new params, per-example
  log-likelihood [N] of the old ones)."""
  sigma2 = float(op.sigma_y) ** 2
  stats_fn = _dense_stats if "cov" in params else _factor_stats
  sums, ll = _map_reduce(
      functools.partial(stats_fn, op=op, image_shape=image_shape, sigma2=sigma2),
      params, data, weight, batch_size=batch_size, mesh=mesh)
  n = sums.pop("n")
  e = jax.tree.map(lambda s: s / n, sums)
  if "cov" in params:
    return _dense_mstep(params["mu"], e["x"], e["xx"], e["p"]), ll
  return _factor_mstep(params["mu"], e, min_var), ll


def _sum_stats(params, chunk, weight):
  del params
  y = chunk["y"].reshape(weight.shape[0], -1)
  return dict(n=jnp.sum(weight), y=weight @ y), jnp.zeros_like(weight)


def _centred_stats(center, chunk, weight):
  y = chunk["y"].reshape(weight.shape[0], -1) - center
  return dict(yy=jnp.einsum("b,bi,bj->ij", weight, y, y)), jnp.zeros_like(weight)


@functools.partial(jax.jit, static_argnames=("batch_size", "mesh"))
def _moments(data, weight, *, batch_size, mesh):
  """Mean [D] and covariance [D, D] (1/N) of the observations, two passes (centred
  second moments stay accurate in float32)."""
  s, _ = _map_reduce(_sum_stats, {}, data, weight, batch_size=batch_size, mesh=mesh)
  mean = s["y"] / s["n"]
  c, _ = _map_reduce(_centred_stats, mean, data, weight, batch_size=batch_size, mesh=mesh)
  return {"mean": mean, "cov": _symmetrize(c["yy"] / s["n"])}


# --------------------------------------------------------------------------
# Fitting.
# --------------------------------------------------------------------------


def _pad_examples(y, omega, batch_size: int, num_devices: int):
  """Pads the examples to a multiple of batch × devices by repeating example 0 (finite
  for every operator) with weight 0. Returns (data, weight, batch)."""
  n = y.shape[0]
  batch = max(1, min(batch_size, -(-n // num_devices)))
  per = batch * num_devices
  n_pad = -(-n // per) * per
  idx = np.concatenate([np.arange(n), np.zeros(n_pad - n, np.int64)])
  data = jax.tree.map(lambda a: jnp.asarray(a)[idx], {"y": y, "omega": omega})
  weight = jnp.asarray(np.arange(n_pad) < n, jnp.float32)
  return data, weight, batch


def _pinv_mean(op, y, omega, chunk: int = 4096) -> jax.Array:
  """mean_i A_i⁺ y_i [D], in chunks."""
  total = 0.0
  pinv = jax.jit(lambda yy, om: jnp.sum(op.pinv(yy, om), axis=0))
  for start in range(0, y.shape[0], chunk):
    sl = slice(start, start + chunk)
    total = total + pinv(y[sl], jax.tree.map(lambda a, sl=sl: a[sl], omega))
  return jnp.reshape(total / y.shape[0], (-1,))


def init_params(op, y, omega, *, rank: int | None, init_mean: str = "pinv",
                init_var: float = 1.0, seed: int = 0) -> GaussianFit:
  """The EM start (see the module docstring): μ₀ = mean A⁺y or 0, Σ₀ = init_var·I
  (dense) or init_var·(I + QQᵀ) (rank r). y [N, H, W, C]."""
  image_shape = tuple(y.shape[1:])
  d = math.prod(image_shape)
  if init_mean == "pinv":
    mu = _pinv_mean(op, jnp.asarray(y, jnp.float32), omega)
  elif init_mean == "zero":
    mu = jnp.zeros((d,), jnp.float32)
  else:
    raise ValueError(f"init_mean must be 'pinv' or 'zero', got {init_mean!r}")
  if rank is None:
    return _to_fit({"mu": mu, "cov": init_var * jnp.eye(d, dtype=jnp.float32)}, image_shape)
  if not 1 <= rank <= d:
    raise ValueError(f"rank must be in [1, D={d}], got {rank!r}")
  q, _ = jnp.linalg.qr(jax.random.normal(jax.random.key(seed), (d, rank), jnp.float32))
  return _to_fit({"mu": mu, "factor": math.sqrt(init_var) * q,
                  "diag": jnp.full((d,), init_var, jnp.float32)}, image_shape)


def fit(op: operators.Operator, y: jax.Array, omega: Omega | None = None, *,
        num_iters: int = 16, rank: int | None = None, init: GaussianFit | None = None,
        init_mean: str = "pinv", init_var: float = 1.0, min_var: float = 1e-6,
        batch_size: int = 256, mesh: jax.sharding.Mesh | None = None, seed: int = 0,
        final_loglik: bool = True, verbose: bool = False) -> GaussianFit:
  """Fits N(μ, Σ) to observations y_i = A_{ω_i} x_i + σ_y ε_i by EM.

  Args:
    op: the operator (its sigma_y must be > 0).
    y: observations [N, H, W, C].
    omega: the examples' operator parameters, leaves [N, ...] ({} or None for
      operators without any, e.g. denoise and blur).
    num_iters: EM iterations T.
    rank: None for a dense Σ [D, D]; r for Σ = U Uᵀ + diag(d), U [D, r].
    init: a start (e.g. a previous fit, to continue it); default `init_params`
      with init_mean, init_var and seed.
    min_var: floor of d (low-rank fits): keeps exactly constant pixels finite.
    batch_size: examples per vmapped chunk (per-example operators).
    mesh: optional 1-D mesh with axis "data": the examples are sharded over it
      and the E-step sums psum'd. None: the default device.
    final_loglik: also evaluate L after the last update (one more E-step).
    verbose: print L / N per iteration.
  Returns:
    GaussianFit; loglik [T + 1] (or [T]), non-decreasing up to float32 rounding.
  """
  sigma2 = _check_operator(op)
  omega = {} if omega is None else omega
  y = jnp.asarray(y, jnp.float32)
  n, image_shape = y.shape[0], tuple(y.shape[1:])
  if init is None:
    init = init_params(op, y, omega, rank=rank, init_mean=init_mean, init_var=init_var,
                       seed=seed)
  params = _params(init)
  num_devices = 1 if mesh is None else mesh.size
  data, weight, batch = _pad_examples(y, omega, batch_size, num_devices)
  if mesh is not None:
    data, weight = jax.device_put((data, weight), NamedSharding(mesh, P("data")))
    params = jax.device_put(params, NamedSharding(mesh, P()))

  if _is_shared(omega):
    a_mat = _example_matrix(op, {}, image_shape)
    measured = jnp.any(a_mat != 0, axis=1)
    moments = _moments(data, weight, batch_size=batch, mesh=mesh)

    def step(p):
      new, ll = _shared_step(p, moments, a_mat, measured, sigma2, min_var=min_var)
      return new, float(ll) * n
  else:
    if "cov" not in params and not isinstance(op, _DIAGONAL):
      raise NotImplementedError(
          f"the low-rank path for per-example operators needs a diagonal A "
          f"({', '.join(c.name for c in _DIAGONAL)}); got {op.name!r}")

    def step(p):
      new, ll = _example_step(p, data, weight, op=op, image_shape=image_shape,
                              batch_size=batch, mesh=mesh, min_var=min_var)
      return new, float(np.sum(np.asarray(ll, np.float64)[:n]))

  history = []
  start = time.time()
  for it in range(num_iters):
    params, ll = step(params)
    history.append(ll)
    if verbose:
      print(f"  EM {it:3d}: log-lik / N = {ll / n:.5f}  ({time.time() - start:.1f} s)",
            flush=True)
  if final_loglik:
    history.append(step(params)[1])
    if verbose:
      print(f"  EM end: log-lik / N = {history[-1] / n:.5f}", flush=True)
  return _to_fit(params, image_shape, np.asarray(history, np.float64))


# --------------------------------------------------------------------------
# Using a fit: restoration, sampling, likelihood.
# --------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("op", "batch_size"))
def _posterior(fit_: GaussianFit, op, y, omega, *, batch_size: int):
  """Posterior means [N, D] and log N(y_i; A_i μ, S_i) [N]."""
  sigma2 = _check_operator(op)
  params = _params(fit_)
  image_shape = fit_.image_shape
  mu = params["mu"]
  yf = y.reshape(y.shape[0], -1)
  if _is_shared(omega):
    a_mat = _example_matrix(op, {}, image_shape)
    measured = jnp.any(a_mat != 0, axis=1)
    chol, logdet, gain, _ = _shared_condition(_dense_cov(params), a_mat, measured, sigma2)
    resid = jnp.where(measured, yf - mu @ a_mat.T, 0.0)
    v = jax.scipy.linalg.solve_triangular(chol, resid.T, lower=True)
    ll = _gaussian_loglik(logdet, jnp.sum(jnp.square(v), axis=0), jnp.sum(measured))
    return mu + resid @ gain.T, ll
  if "cov" in params:
    def chunk_fn(yc, om):
      a_mats = jax.vmap(lambda o: _example_matrix(op, o, image_shape))(om)
      dm, _, ll = jax.vmap(_dense_example, in_axes=(None, None, 0, 0, None))(
          mu, params["cov"], yc, a_mats, sigma2)
      return mu + dm, ll
  else:
    def chunk_fn(yc, om):
      a = jax.vmap(lambda o: _diagonal_entries(op, o, image_shape))(om)
      post = _factor_posterior(mu, params["factor"], params["diag"], yc, a, sigma2)
      return post["x_mean"], post["loglik"]
  return _chunked(chunk_fn, (yf, omega), batch_size)


def _chunked(fn: Callable, xs, batch_size: int):
  """fn over [N, ...] inputs in sequential chunks of batch_size (the last one padded by
  repeating example 0); fn maps a chunk to outputs with the same leading axis."""
  n = jax.tree.leaves(xs)[0].shape[0]
  batch = max(1, min(batch_size, n))
  n_pad = -(-n // batch) * batch
  idx = jnp.concatenate([jnp.arange(n), jnp.zeros((n_pad - n,), jnp.int32)])
  chunks = jax.tree.map(lambda a: a[idx].reshape((n_pad // batch, batch) + a.shape[1:]), xs)
  out = jax.lax.map(lambda c: fn(*c), chunks)
  return jax.tree.map(lambda a: a.reshape((n_pad,) + a.shape[2:])[:n], out)


def _check_fit_operator(fit_: GaussianFit, op, omega) -> None:
  if fit_.cov is None and not _is_shared(omega) and not isinstance(op, _DIAGONAL):
    raise NotImplementedError(f"low-rank fits restore per-example operators only if "
                              f"diagonal; got {op.name!r}")


def posterior_mean(fit_: GaussianFit, op: operators.Operator, y: jax.Array,
                   omega: Omega | None = None, *, batch_size: int = 256) -> jax.Array:
  """E[x | y_i] under the fitted prior (the Wiener-type restorer), [N, H, W, C].

  y: [N, H, W, C]; omega: leaves [N, ...] or {} / None.
  """
  omega = {} if omega is None else omega
  _check_fit_operator(fit_, op, omega)
  mean, _ = _posterior(fit_, op, jnp.asarray(y, jnp.float32), omega, batch_size=batch_size)
  return mean.reshape(y.shape)


def log_likelihood(fit_: GaussianFit, op: operators.Operator, y: jax.Array,
                   omega: Omega | None = None, *, batch_size: int = 256) -> jax.Array:
  """log N(y_i; A_i μ, A_i Σ A_iᵀ + σ_y² I) on the measured coordinates, [N]."""
  omega = {} if omega is None else omega
  _check_fit_operator(fit_, op, omega)
  _, ll = _posterior(fit_, op, jnp.asarray(y, jnp.float32), omega, batch_size=batch_size)
  return ll


def posterior_moments(fit_: GaussianFit, op: operators.Operator, y: jax.Array,
                      omega: Omega | None = None) -> tuple[jax.Array, jax.Array]:
  """Posterior means [N, D] and covariances P_i [N, D, D], dense (small D only; a
  low-rank fit is materialised)."""
  sigma2 = _check_operator(op)
  omega = {} if omega is None else omega
  params = _params(fit_)
  mu, cov = params["mu"], _dense_cov(params)
  yf = jnp.asarray(y, jnp.float32).reshape(y.shape[0], -1)
  if _is_shared(omega):
    a_mats = jnp.broadcast_to(_example_matrix(op, {}, fit_.image_shape),
                              (yf.shape[0],) + (yf.shape[1],) * 2)
  else:
    a_mats = operator_matrix(op, fit_.image_shape, omega)
  dm, post, _ = jax.vmap(_dense_example, in_axes=(None, None, 0, 0, None))(
      mu, cov, yf, a_mats, sigma2)
  return mu + dm, post


def sample(fit_: GaussianFit, rng: jax.Array, n: int) -> jax.Array:
  """n draws of the fitted prior, [n, H, W, C]."""
  params = _params(fit_)
  mu = params["mu"]
  d = mu.shape[0]
  if "cov" in params:
    # eigh, not Cholesky: a fitted Σ may be singular (e.g. constant pixels).
    lam, vec = jnp.linalg.eigh(params["cov"])
    root = vec * jnp.sqrt(jnp.maximum(lam, 0.0))
    x = mu + jax.random.normal(rng, (n, d)) @ root.T
  else:
    kz, ke = jax.random.split(rng)
    r = params["factor"].shape[1]
    x = (mu + jax.random.normal(kz, (n, r)) @ params["factor"].T
         + jnp.sqrt(params["diag"]) * jax.random.normal(ke, (n, d)))
  return x.reshape((n,) + fit_.image_shape)


def posterior_sample(fit_: GaussianFit, op: operators.Operator, y: jax.Array,
                     omega: Omega | None, rng: jax.Array, *,
                     batch_size: int = 256) -> jax.Array:
  """One exact draw of p(x | y_i) per example, [N, H, W, C].

  Matheron's rule (perturb-and-MAP for Gaussians): with x₀ ~ N(μ, Σ) and
  y₀ = A x₀ + σ_y ε₀ a simulated observation, x₀ + K (y − y₀) has law
  N(m, P); K (y − y₀) is the difference of two posterior means.
  """
  omega = {} if omega is None else omega
  k_prior, k_noise = jax.random.split(rng)
  x0 = sample(fit_, k_prior, y.shape[0])
  y0 = op.measure(k_noise, x0, omega)
  return (x0 + posterior_mean(fit_, op, y, omega, batch_size=batch_size)
          - posterior_mean(fit_, op, y0, omega, batch_size=batch_size))


def prior_params(fit_: GaussianFit) -> Params:
  """The fit as arrays (to keep in a TrainState): {"mu", "cov"} or {"mu", "factor", "diag"}."""
  return _params(fit_)


def prior_from_params(params: Params, image_shape) -> GaussianFit:
  """The GaussianFit of `prior_params` (images of `image_shape`); no log-likelihood."""
  return _to_fit(params, tuple(image_shape))


def prior_shapes(image_shape, rank: int | None) -> dict[str, jax.ShapeDtypeStruct]:
  """Shapes of `prior_params` of a dense (rank None) or rank-r fit, without fitting."""
  d = math.prod(image_shape)
  f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
  if rank is None:
    return {"mu": f32(d), "cov": f32(d, d)}
  return {"mu": f32(d), "factor": f32(d, rank), "diag": f32(d)}


# --------------------------------------------------------------------------
# The fitted prior's log-density (the flow's prior term in flowdiff's hand-over).
# --------------------------------------------------------------------------

# No direction of the fitted prior is more certain than about one 8-bit level
# (std 0.01 on [-1, 1]): a fitted Σ can be singular (constant pixels), and the
# log-density's gradient Σ⁻¹(x − μ) must stay finite and not too stiff.
LOG_DENSITY_VAR_FLOOR = 1e-4


def log_density_shapes(image_shape, rank: int | None) -> dict[str, jax.ShapeDtypeStruct]:
  """Shapes of `log_density_params` of a dense (rank None) or rank-r fit, without fitting."""
  d = math.prod(image_shape)
  f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
  if rank is None:
    return {"mu": f32(d), "precision": f32(d, d), "logdet": f32()}
  return {"mu": f32(d), "diag_inv": f32(d), "w": f32(d, rank), "logdet": f32()}


def log_density_params(fit_: GaussianFit,
                       var_floor: float = LOG_DENSITY_VAR_FLOOR) -> dict[str, jax.Array]:
  """Params of `log_density` (x ↦ log N(x; μ, Σ)), precomputed once in float64 on the host.

  Dense fits: {"mu", "precision" Σ⁻¹ [D, D], "logdet"}, Σ's eigenvalues floored
  at `var_floor`. Low-rank fits Σ = U Uᵀ + diag(d): d floored at `var_floor`,
  and by Woodbury Σ⁻¹ = diag(1/d) − W Wᵀ with W = diag(1/d) U L⁻ᵀ [D, r],
  L Lᵀ = I + Uᵀ diag(1/d) U; {"mu", "diag_inv", "w", "logdet"}.
  """
  params = jax.tree.map(lambda a: np.asarray(a, np.float64), _params(fit_))
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  if "cov" in params:
    lam, vec = np.linalg.eigh(0.5 * (params["cov"] + params["cov"].T))
    lam = np.maximum(lam, var_floor)
    return {"mu": f32(params["mu"]), "precision": f32((vec / lam) @ vec.T),
            "logdet": f32(np.sum(np.log(lam)))}
  u, d = params["factor"], np.maximum(params["diag"], var_floor)
  inner = np.eye(u.shape[1]) + (u.T / d) @ u
  chol = np.linalg.cholesky(inner)
  w = np.linalg.solve(chol, (u / d[:, None]).T).T
  logdet = np.sum(np.log(d)) + 2.0 * np.sum(np.log(np.diag(chol)))
  return {"mu": f32(params["mu"]), "diag_inv": f32(1.0 / d), "w": f32(w), "logdet": f32(logdet)}


def log_density(params: dict[str, jax.Array], x: jax.Array) -> jax.Array:
  """log N(x; μ, Σ) [N] for images x [N, H, W, C], with `log_density_params`'s params.

  Pure and jittable; differentiable in x (the flow methods' prior term).
  """
  r = x.reshape(x.shape[0], -1) - params["mu"]
  if "precision" in params:
    quad = jnp.einsum("nd,de,ne->n", r, params["precision"], r)
  else:
    quad = jnp.sum(params["diag_inv"] * r * r, axis=-1) - jnp.sum((r @ params["w"])**2, axis=-1)
  return -0.5 * (quad + params["logdet"] + r.shape[-1] * _LOG_2PI)


# --------------------------------------------------------------------------
# The posterior mean as a small, jittable restorer (the flow's base x̂₀(y)).
# --------------------------------------------------------------------------


def restorer_shapes(op: operators.Operator, image_shape, rank: int | None
                    ) -> dict[str, jax.ShapeDtypeStruct]:
  """The shapes of `restorer`'s params for this operator, without fitting anything.

  Shared operators (denoise, blur): {"mu": [D], "gain": [D, D]}; per-example
  diagonal ones (masks): {"mu": [D], "factor": [D, r], "diag": [D]}.
  """
  d = math.prod(image_shape)
  f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
  if op.name in ("denoise", "blur"):
    return {"mu": f32(d), "gain": f32(d, d)}
  if not isinstance(op, _DIAGONAL) or rank is None:
    raise NotImplementedError(
        f"a restorer for the per-example operator {op.name!r} needs a low-rank fit (rank > 0) "
        f"and a diagonal operator ({', '.join(c.name for c in _DIAGONAL)})")
  return {"mu": f32(d), "factor": f32(d, rank), "diag": f32(d)}


def restorer(fit_: GaussianFit, op: operators.Operator) -> dict[str, jax.Array]:
  """Params of `restore` (x ↦ E[x | y] under the fit), precomputed once.

  For an operator shared by all examples the posterior mean is affine in y,
  m = μ + K (y − A μ), so the gain K [D, D] is formed here (one D×D Cholesky)
  and `restore` is one matrix product. For per-example masks it keeps the
  factor model and `restore` solves one r×r system per example.
  """
  sigma2 = _check_operator(op)
  params = _params(fit_)
  shapes = restorer_shapes(op, fit_.image_shape, fit_.rank)
  if "gain" in shapes:
    a_mat = _example_matrix(op, {}, fit_.image_shape)
    measured = jnp.any(a_mat != 0, axis=1)
    _, _, gain, _ = _shared_condition(_dense_cov(params), a_mat, measured, sigma2)
    return {"mu": params["mu"], "gain": gain}
  return {"mu": params["mu"], "factor": params["factor"], "diag": params["diag"]}


def restore(params: dict[str, jax.Array], op: operators.Operator, y: jax.Array,
            omega: Omega) -> jax.Array:
  """E[x | y] [B, H, W, C] for observations y [B, H, W, C] with `restorer`'s params.

  Pure and jittable: the flow methods call it inside the train step.
  """
  sigma2 = float(op.sigma_y) ** 2
  b, image_shape = y.shape[0], y.shape[1:]
  mu = params["mu"]
  yf = y.reshape(b, -1)
  if "gain" in params:
    a_mu = op.apply(jnp.broadcast_to(mu.reshape(image_shape), y.shape), omega).reshape(b, -1)
    return (mu + (yf - a_mu) @ params["gain"].T).reshape(y.shape)
  a = op.apply(jnp.ones(y.shape, y.dtype), omega).reshape(b, -1)
  post = _factor_posterior(mu, params["factor"], params["diag"], yf, a, sigma2)
  return post["x_mean"].reshape(y.shape)


def denoise_mle(y: Any, sigma_y: float) -> GaussianFit:
  """The closed-form Gaussian MLE from denoising data y = x + σ_y ε, [N, H, W, C]:
  μ = ȳ, Σ = C_y − σ_y² I with negative eigenvalues set to 0 (C_y with 1/N).
  EM's fixed point for denoising; computed in float64 on the host."""
  y = np.asarray(y, np.float64)
  yf = y.reshape(y.shape[0], -1)
  mean = yf.mean(0)
  c = (yf - mean).T @ (yf - mean) / yf.shape[0]
  lam, vec = np.linalg.eigh(c)
  cov = (vec * np.maximum(lam - sigma_y**2, 0.0)) @ vec.T
  return GaussianFit(mean=jnp.asarray(mean.reshape(y.shape[1:]), jnp.float32),
                     cov=jnp.asarray(cov, jnp.float32))
