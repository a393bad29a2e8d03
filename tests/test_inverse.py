"""Inverse-problem solvers (flowdiff_jax/inverse.py) against closed forms.

With a Gaussian prior N(μ, Σ) and a linear operator, p(x | y) is Gaussian:

    P = (Σ⁻¹ + AᵀA / σ_y²)⁻¹,   m(y) = P (Σ⁻¹ μ + Aᵀ y / σ_y²),

and the prior's ε-network is analytic: ε̂(x_t, t) = σ_t C_t⁻¹ (x_t − α_t μ),
C_t = α_t² Σ + σ_t² I, written with Σ's eigendecomposition (computed on the
host in float64: batched LAPACK inside jit can deadlock XLA's CPU pool).
Images are 4×4×1 (D = 16); A is read off the operator column by column.
"""

import dataclasses
import functools
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flowdiff_jax import diffusion, inverse, operators, oracle, sampling, solvers

_SIZE = 4
_D = _SIZE * _SIZE
_SCHEDULE = diffusion.VPSchedule()

# Small versions of the three tasks (a 3×3 blur fits a 4×4 image).
_OPERATORS = {
    "denoise": operators.Denoise(sigma_y=0.2),
    "inpaint": operators.RandomInpaint(sigma_y=0.05, drop_prob=0.6),
    "deblur": operators.GaussianBlur(sigma_y=0.05, kernel_size=3, kernel_std=1.0),
}


def _gaussian_params(mu, cov):
  """(eigenvectors [D, D], eigenvalues [D], mean [D]) of N(mu, cov), from float64 on the host."""
  lam, u = np.linalg.eigh(cov)
  return tuple(jnp.asarray(a, jnp.float32) for a in (u, lam, mu))


def _gaussian_eps_apply(params, x, t):
  """The exact ε̂ of N(μ, Σ) data: (x_t [B, 4, 4, 1], t [B]) -> [B, 4, 4, 1]."""
  u, lam, mu = params
  alpha, sigma = _SCHEDULE.alpha_sigma(t)
  d = (x.reshape(x.shape[0], -1) - alpha[:, None] * mu) @ u
  w = d / (alpha[:, None]**2 * lam + sigma[:, None]**2)
  return (sigma[:, None] * (w @ u.T)).reshape(x.shape)


def _gaussian_eps(mu, cov):
  params = _gaussian_params(mu, cov)
  return lambda x, t: _gaussian_eps_apply(params, x, t)


def _matrix(op, omega_one):
  """A [D, D] (float64) of op with one example's batched omega (leaves [1, ...])."""
  basis = jnp.eye(_D, dtype=jnp.float32).reshape(_D, _SIZE, _SIZE, 1)
  omega = jax.tree.map(lambda a: jnp.broadcast_to(a, (_D,) + a.shape[1:]), omega_one)
  return np.asarray(op.apply(basis, omega), np.float64).reshape(_D, _D).T


def _posterior(op, omega_one, y_one, mu, cov):
  """(m [D], P [D, D]) of x | y for one example."""
  a = _matrix(op, omega_one)
  prec = np.linalg.inv(cov)
  p = np.linalg.inv(prec + a.T @ a / op.sigma_y**2)
  m = p @ (prec @ mu + a.T @ np.asarray(y_one, np.float64).reshape(-1) / op.sigma_y**2)
  return m, p


def _observe(op, mu, cov, seed=0):
  """8 clean draws x ~ N(mu, cov) and their measurements (y [8, 4, 4, 1], omega).

  Always 8, so that every test reuses the same compiled corruption.
  """
  z = np.random.default_rng(seed).standard_normal((8, _D))
  x = jnp.asarray((mu + z @ np.linalg.cholesky(cov).T).reshape(8, _SIZE, _SIZE, 1),
                  jnp.float32)
  measured = operators.corrupt(op, x, jnp.arange(8), seed)
  return measured.pop("y"), measured


def _solve(solver, op, mu, cov, y, omega, seed=0):
  keys = solvers.example_keys(seed, jnp.arange(y.shape[0]))
  fn = jax.jit(lambda y, omega, keys: solvers.solve(
      solver, _gaussian_eps(mu, cov), _SCHEDULE, op, y, omega, keys))
  return np.asarray(fn(y, omega, keys), np.float64)


def _repeat(tree, n):
  return jax.tree.map(lambda a: jnp.repeat(a, n, axis=0), tree)


def test_tasks_use_the_operators_of_the_fmnist_configs():
  for task, config_name in inverse.TASK_CONFIGS.items():
    config = importlib.import_module(f"flowdiff_jax.configs.{config_name}").get_config()
    assert inverse.task_operator(task) == operators.make_operator(config.operator), task
  assert inverse.task_operator("denoise", sigma_y=0.1).sigma_y == 0.1
  with pytest.raises(ValueError, match="unknown task"):
    inverse.task_operator("superres")


@pytest.mark.parametrize("op", [
    operators.Denoise(0.2), operators.RandomInpaint(0.05), operators.BoxInpaint(0.1, box_size=2),
    operators.GaussianBlur(0.05, kernel_size=3, kernel_std=1.0)], ids=lambda op: op.name)
def test_inverse_measurement_cov_matches_a_dense_solve(op):
  y, omega = jax.tree.map(lambda a: a[:3], _observe(op, np.zeros(_D), 0.1 * np.eye(_D)))
  v = jax.random.normal(jax.random.key(1), y.shape)
  v = op.apply(v, omega)  # in the range of A (0 on dropped pixels), as the solver's residuals
  r2 = 0.3
  got = np.asarray(solvers.inverse_measurement_cov(op, r2, v, omega), np.float64)
  for i in range(3):
    one = jax.tree.map(lambda a: a[i:i + 1], omega)
    a = _matrix(op, one)
    keep = np.abs(a).sum(axis=1) > 0  # measured rows (all, except dropped pixels)
    a = a[keep]
    want = np.linalg.solve(r2 * a @ a.T + op.sigma_y**2 * np.eye(a.shape[0]),
                           np.asarray(v[i], np.float64).reshape(-1)[keep])
    np.testing.assert_allclose(got[i].reshape(-1)[keep], want, rtol=2e-4, atol=1e-5)
    np.testing.assert_array_equal(got[i].reshape(-1)[~keep], 0.0)


# Tolerances of the exact-posterior check, in whitened units (P^{-1/2}): for
# K × N samples of an exact sampler the mean error of one observation is
# ≈ 1/√N = 0.03 per dimension and the covariance error ≈ √((D+1)/(K N)) =
# 0.09; the ancestral sampler's time discretisation adds 0.04–0.11 at 1000
# steps (computed exactly for these problems in float64). Measured (mean,
# covariance) errors for denoise / inpaint / deblur:
#   this solver:                      0.035/0.099, 0.029/0.125, 0.035/0.105;
#   told σ_y/2 (the [0, 1] scale):    0.41/0.68,   0.10/0.50,   0.44/0.68;
#   ignoring y (σ_y × 10⁴):           1.4/5.4,     4.7/57,      2.7/22;
#   ΠGDM's approximate r_t² (v = 1):  0.23/0.19,   0.17/0.11,   0.22/0.16.
_MEAN_TOL, _COV_TOL = 0.12, 0.22


def _posterior_errors(samples, op, y, omega, mu, cov, num):
  """(max whitened mean error, whitened covariance error) of samples [K*num, D]."""
  k = y.shape[0]
  samples = samples.reshape(k, num, _D)
  mean_errors, whitened = [], []
  for i in range(k):
    m, p = _posterior(op, jax.tree.map(lambda a: a[i:i + 1], omega), y[i], mu, cov)
    w, v = np.linalg.eigh(p)
    white = v @ np.diag(w**-0.5) @ v.T
    mean_errors.append(np.linalg.norm(white @ (samples[i].mean(0) - m)) / np.sqrt(_D))
    whitened.append((samples[i] - m) @ white.T)
  r = np.concatenate(whitened)
  cov_error = np.linalg.norm(r.T @ r / len(r) - np.eye(_D)) / np.sqrt(_D)
  return max(mean_errors), cov_error


_K_EXACT, _N_EXACT = 2, 1000  # observations × samples of the exact-posterior check


@functools.cache
def _pigdm_run(task, sigma_y_factor=1.0):
  """(samples [K*N, D], y [K, ...], omega, mu, cov) of ΠGDM (data_var = s², exact here) on an
  N(μ, s² I) prior, s = 0.3, told σ_y × sigma_y_factor. Shared by two tests."""
  op = _OPERATORS[task]
  mu, _ = oracle.gaussian_problem(_SIZE)
  cov = 0.3**2 * np.eye(_D)
  y, omega = jax.tree.map(lambda a: a[:_K_EXACT], _observe(op, mu, cov))
  told = dataclasses.replace(op, sigma_y=op.sigma_y * sigma_y_factor)
  solver = solvers.PiGDM(num_steps=1000, data_var=0.3**2, clip=False)
  samples = _solve(solver, told, mu, cov, *_repeat((y, omega), _N_EXACT))
  return samples.reshape(-1, _D), y, omega, mu, cov


@pytest.mark.parametrize("task", list(_OPERATORS))
def test_pigdm_samples_the_closed_form_gaussian_posterior(task):
  """ΠGDM with data_var = s² is exact for an N(μ, s² I) prior: its samples must
  have the posterior's mean and covariance. For inpainting (where a wrong σ_y
  moves the mean least), the same solver told σ_y/2 (the [0, 1] scale) must
  fail the check; it does for the other tasks too (see the numbers above),
  not rerun here to save time."""
  op = _OPERATORS[task]
  samples, y, omega, mu, cov = _pigdm_run(task)
  mean_error, cov_error = _posterior_errors(samples, op, y, omega, mu, cov, _N_EXACT)
  assert mean_error < _MEAN_TOL and cov_error < _COV_TOL, (mean_error, cov_error)
  if task == "inpaint":
    samples, *_ = _pigdm_run(task, sigma_y_factor=0.5)
    mean_error, cov_error = _posterior_errors(samples, op, y, omega, mu, cov, _N_EXACT)
    assert cov_error > 1.5 * _COV_TOL, (mean_error, cov_error)


# The box operator joins MMPS's check: MMPS handles every linear operator.
_MMPS_OPERATORS = {**_OPERATORS, "box": operators.BoxInpaint(sigma_y=0.05, box_size=2)}


@functools.cache
def _mmps_run(task, cg_iters=_D):
  """(samples [K*N, D], y, omega, mu, cov) of MMPS on the *correlated* Gaussian prior of
  `oracle.gaussian_problem`, with enough CG iterations (D) to solve exactly."""
  op = _MMPS_OPERATORS[task]
  mu, cov = oracle.gaussian_problem(_SIZE)
  y, omega = jax.tree.map(lambda a: a[:_K_EXACT], _observe(op, mu, cov, seed=2))
  solver = solvers.MMPS(num_steps=1000, cg_iters=cg_iters, clip=False)
  samples = _solve(solver, op, mu, cov, *_repeat((y, omega), _N_EXACT))
  return samples.reshape(-1, _D), y, omega, mu, cov


@pytest.mark.parametrize("task", list(_MMPS_OPERATORS))
def test_mmps_samples_the_closed_form_gaussian_posterior(task):
  """With the exact ε-network of a correlated Gaussian, MMPS's V_t = (σ_t²/α_t) ∂x̂₀/∂x_t
  is the exact Cov[x₀ | x_t], so (CG run to convergence) its samples have the exact
  posterior's mean and covariance for every operator, where ΠGDM's isotropic
  r_t² would not (its check above uses an isotropic prior).

  Measured (mean, covariance) errors, denoise / inpaint / deblur / box:
    16 CG iterations (this test): 0.036/0.109, 0.032/0.131, 0.036/0.115, 0.032/0.159;
    1 iteration:                  0.135/0.145, 0.094/0.131, 0.231/0.253, 0.187/0.201;
    0 iterations (no guidance):   1.6/8.3,     4.4/62,      3.0/73,      4.9/107.
  """
  op = _MMPS_OPERATORS[task]
  samples, y, omega, mu, cov = _mmps_run(task)
  mean_error, cov_error = _posterior_errors(samples, op, y, omega, mu, cov, _N_EXACT)
  assert mean_error < _MEAN_TOL and cov_error < _COV_TOL, (mean_error, cov_error)


def test_conjugate_gradient_solves_each_example_exactly():
  rng = np.random.default_rng(0)
  mats = [(lambda q: q @ q.T + 0.1 * np.eye(5))(rng.standard_normal((5, 5))) for _ in range(3)]
  m = jnp.asarray(np.stack(mats), jnp.float32)
  b = jnp.asarray(rng.standard_normal((3, 5)), jnp.float32).at[1].set(0.0)  # one converged
  u = solvers.conjugate_gradient(lambda v: jnp.einsum("bij,bj->bi", m, v), b, 5)
  want = np.stack([np.linalg.solve(a, v) for a, v in zip(mats, np.asarray(b, np.float64))])
  np.testing.assert_allclose(np.asarray(u), want, rtol=2e-3, atol=2e-4)
  # One example's solve does not depend on its batch.
  alone = solvers.conjugate_gradient(lambda v: jnp.einsum("bij,bj->bi", m[2:], v), b[2:], 5)
  np.testing.assert_allclose(np.asarray(alone), np.asarray(u[2:]), rtol=1e-6, atol=1e-6)


@functools.cache
def _dps_run(task):
  """(samples [K, N, D], y [K, ...], omega, mu, cov): DPS (ζ = 0.1, 200 steps) with a
  correlated Gaussian prior, K = 8 observations × N = 32 samples. Shared by two tests."""
  op = _OPERATORS[task]
  mu, cov = oracle.gaussian_problem(_SIZE)
  y, omega = _observe(op, mu, cov, seed=1)
  samples = _solve(solvers.DPS(zeta=0.1, num_steps=200, clip=False), op, mu, cov,
                   *_repeat((y, omega), 32))
  return samples.reshape(8, 32, _D), y, omega, mu, cov


@pytest.mark.parametrize("task", list(_OPERATORS))
def test_dps_is_closer_to_the_posterior_mean_than_the_observation(task):
  """DPS's estimate of E[x | y] (the mean of 32 samples) is nearer the exact
  posterior mean than A⁺y is, and than the prior mean μ is (what a solver that
  ignores y would give), for a correlated Gaussian prior.

  Measured RMS distances to the posterior mean, denoise / inpaint / deblur:
  DPS 0.27 / 0.17 / 0.38, A⁺y 0.63 / 0.70 / 1.76, μ 1.03 / 1.05 / 0.98, DPS
  with the guidance's sign flipped 3.4 / 2.9 / 3.4.
  """
  op = _OPERATORS[task]
  samples, y, omega, mu, cov = _dps_run(task)
  k = y.shape[0]
  m = np.stack([_posterior(op, jax.tree.map(lambda a: a[i:i + 1], omega), y[i], mu, cov)[0]
                for i in range(k)])
  pinv = np.asarray(op.pinv(y, omega), np.float64).reshape(k, _D)
  dist = lambda a: np.sqrt(np.mean(np.sum((a - m)**2, axis=1)))
  bound = 0.7 * min(dist(pinv), dist(np.broadcast_to(mu, m.shape)))
  assert dist(samples.mean(1)) < bound, (dist(samples.mean(1)), dist(pinv), dist(mu))


_SMALL_SOLVERS = [solvers.DPS(zeta=0.1, num_steps=20), solvers.PiGDM(num_steps=20),
                  solvers.MMPS(num_steps=20)]


@pytest.mark.parametrize("solver", _SMALL_SOLVERS, ids=lambda s: s.name)
def test_solvers_are_deterministic_per_example_and_chunkable(solver):
  op = _OPERATORS["inpaint"]
  mu, cov = oracle.gaussian_problem(_SIZE)
  y, omega = jax.tree.map(lambda a: a[:6], _observe(op, mu, cov))
  eps_fn = _gaussian_eps(mu, cov)
  fn = jax.jit(lambda y, omega, keys: solvers.solve(solver, eps_fn, _SCHEDULE, op, y, omega,
                                                    keys))
  keys = solvers.example_keys(0, jnp.arange(6))
  first = np.asarray(fn(y, omega, keys))
  np.testing.assert_array_equal(first, np.asarray(fn(y, omega, keys)))
  other = np.asarray(fn(y, omega, solvers.example_keys(1, jnp.arange(6))))
  assert np.all(np.abs(other - first).reshape(6, -1).max(axis=1) > 1e-3)
  # An example's solution depends on its own key and data only, not on its batch.
  perm = np.array([3, 5, 0, 1, 4, 2])
  permuted = np.asarray(fn(*jax.tree.map(lambda a: a[perm], (y, omega, keys))))
  np.testing.assert_allclose(permuted, first[perm], rtol=0, atol=1e-5)
  if solver.name == "dps":  # the host loop is the same for both solvers
    # 21 steps in 4 chunks of 6, the last padded with no-op steps: the same solve.
    done = []
    chunked = solvers.solve_chunked(solver, _gaussian_eps_apply, _gaussian_params(mu, cov),
                                    _SCHEDULE, op, y, omega, keys, num_chunks=4,
                                    progress=done.append)
    np.testing.assert_allclose(np.asarray(chunked), first, rtol=0, atol=1e-5)
    assert done == [6, 12, 18, 21]


@pytest.mark.parametrize("solver", ["dps", "pigdm"])
def test_inpainting_keeps_observed_pixels_within_the_noise_level(solver):
  """On observed pixels x − y has RMS ≈ σ_y for the exact posterior (the noise y
  carries: σ_y √(s²/(s² + σ_y²)), plus a small shrinkage toward μ); a solver
  that ignores y is ~0.4 = 8 σ_y off. Checked on the samples of the two tests above
  (measured RMS: ΠGDM 0.93 σ_y, DPS 0.68 σ_y)."""
  op = _OPERATORS["inpaint"]
  samples, y, omega, *_ = _dps_run("inpaint") if solver == "dps" else _pigdm_run("inpaint")
  k = y.shape[0]
  x = samples.reshape(k, -1, _D)
  y = np.asarray(y, np.float64).reshape(k, 1, _D)
  observed = np.broadcast_to(np.asarray(omega["mask"], bool).reshape(k, 1, _D), x.shape)
  diff = (x - y)[observed]
  rms = np.sqrt(np.mean(diff**2))
  assert rms < 1.5 * op.sigma_y, rms / op.sigma_y
  # Tails: Gaussian errors of std σ_y have their 99th |percentile| at 2.6 σ_y
  # (measured: ΠGDM 2.4, DPS 2.8, whose rare outliers reach 7 σ_y).
  assert np.quantile(np.abs(diff), 0.99) < 3.5 * op.sigma_y


@pytest.mark.parametrize("sigma_y", [0.05, 0.2, 1.0])
def test_tweedie_posterior_mean_is_the_closed_form_denoising_mean(sigma_y):
  """With the exact ε-network of a correlated Gaussian, one pass at the t where
  σ_t/α_t = σ_y must give the closed-form E[x | y] of y = x + σ_y ε (float32
  error only); the noisy observation itself must be far from it."""
  op = operators.Denoise(sigma_y=sigma_y)
  mu, cov = oracle.gaussian_problem(_SIZE)
  y, omega = _observe(op, mu, cov, seed=3)
  mean = np.asarray(jax.jit(lambda y: sampling.tweedie_posterior_mean(
      _gaussian_eps(mu, cov), _SCHEDULE, y, sigma_y))(y), np.float64).reshape(8, _D)
  exact = np.stack([_posterior(op, {}, y[i], mu, cov)[0] for i in range(8)])
  scale = np.abs(exact - np.asarray(y, np.float64).reshape(8, _D)).max()
  np.testing.assert_allclose(mean, exact, atol=2e-3 * scale, rtol=0)
  assert scale > 0.02


def test_tweedie_posterior_mean_refuses_noise_levels_outside_the_schedule():
  eps = _gaussian_eps(*oracle.gaussian_problem(_SIZE))
  y = jnp.zeros((1, _SIZE, _SIZE, 1))
  for sigma_y in (1e-4, 1e3):
    with pytest.raises(ValueError, match="outside the schedule"):
      sampling.tweedie_posterior_mean(eps, _SCHEDULE, y, sigma_y)
