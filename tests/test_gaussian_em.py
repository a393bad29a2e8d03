"""Tests of flowdiff_jax/gaussian_em.py: exact posteriors against dense linear algebra,
EM's monotone likelihood, recovery of Σ from corrupted data, sharding.

Sizes are tiny (4×4×1 images, D = 16) and everything is float32, so the
references are float64 numpy and the tolerances are float32-sized.
Covariance errors are Frobenius norms ‖Σ̂ − Σ‖_F; the "sampling floor" is
‖Ĉ_clean − Σ‖_F with Ĉ_clean the (1/N) sample covariance of the clean x.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flowdiff_jax import gaussian_em as ge, operators

SIZE = 4
SHAPE = (SIZE, SIZE, 1)
D = SIZE * SIZE

OPS = {
    "denoise": operators.Denoise(sigma_y=0.1),
    "blur": operators.GaussianBlur(sigma_y=0.05, kernel_size=3, kernel_std=1.0),
    "inpaint_random": operators.RandomInpaint(sigma_y=0.05, drop_prob=0.3),
    "inpaint_box": operators.BoxInpaint(sigma_y=0.05, box_size=2),
}


def _random_cov(rng, d=D, scale=0.09, ridge=0.2):
  b = rng.standard_normal((d, d))
  return scale * (b @ b.T / d + ridge * np.eye(d))


def _problem(seed=0, n=2048, lowrank=None):
  """(μ [D], Σ [D, D], clean x [n, 4, 4, 1] float32) with x ~ N(μ, Σ)."""
  rng = np.random.default_rng(seed)
  if lowrank:
    u = 0.25 * rng.standard_normal((D, lowrank))
    sigma = u @ u.T + np.diag(0.01 + 0.02 * rng.random(D))
  else:
    sigma = _random_cov(rng)
  mu = 0.1 * rng.standard_normal(D)
  x = mu + rng.standard_normal((n, D)) @ np.linalg.cholesky(sigma).T
  return mu, sigma, x.reshape((n,) + SHAPE).astype(np.float32)


def _observe(op, x, seed=0):
  measured = operators.corrupt(op, jnp.asarray(x), jnp.arange(x.shape[0]), seed)
  return measured.pop("y"), measured


def _matrix_by_basis(op, omega_i):
  """A of one example [D, D] by applying op to each basis image separately (an
  independent construction of what the module builds in one batched call)."""
  cols = []
  om = jax.tree.map(lambda a: a[None], omega_i)
  for j in range(D):
    e = np.zeros((1,) + SHAPE, np.float32)
    e.reshape(-1)[j] = 1.0
    cols.append(np.asarray(op.apply(jnp.asarray(e), om), np.float64).reshape(-1))
  return np.stack(cols, axis=1)


def _info_form(mu, sigma, a, y, sigma_y):
  """Posterior by the information form, float64: P = (Σ⁻¹ + AᵀA/σ²)⁻¹, m = P(Aᵀy/σ² + Σ⁻¹μ)."""
  s_inv = np.linalg.inv(sigma)
  p = np.linalg.inv(s_inv + a.T @ a / sigma_y**2)
  return p @ (a.T @ y / sigma_y**2 + s_inv @ mu), p


def _obs_loglik(mu, sigma, a, y, sigma_y):
  """log N(y_O; A_O μ, A_O Σ A_Oᵀ + σ² I) on the measured rows O, float64."""
  rows = np.any(a != 0, axis=1)
  ao, yo = a[rows], y[rows]
  s = ao @ sigma @ ao.T + sigma_y**2 * np.eye(rows.sum())
  r = yo - ao @ mu
  _, logdet = np.linalg.slogdet(s)
  return -0.5 * (rows.sum() * np.log(2 * np.pi) + logdet + r @ np.linalg.solve(s, r))


def _example(tree, i):
  return jax.tree.map(lambda a: a[i], tree)


def _random_fit(rng, rank):
  mu = 0.1 * rng.standard_normal(D)
  if rank is None:
    sigma = _random_cov(rng)
    fit = ge.GaussianFit(mean=jnp.asarray(mu.reshape(SHAPE), jnp.float32),
                         cov=jnp.asarray(sigma, jnp.float32))
  else:
    u = 0.3 * rng.standard_normal((D, rank))
    d = 0.02 + 0.05 * rng.random(D)
    sigma = u @ u.T + np.diag(d)
    fit = ge.GaussianFit(mean=jnp.asarray(mu.reshape(SHAPE), jnp.float32),
                         factor=jnp.asarray(u, jnp.float32), diag=jnp.asarray(d, jnp.float32))
  return mu, sigma, fit


# --------------------------------------------------------------------------
# Exact formulas.
# --------------------------------------------------------------------------


def test_spd_inverse_matches_numpy():
  rng = np.random.default_rng(0)
  a = np.stack([_random_cov(rng, 12, 1.0, 0.05) for _ in range(3)])
  inv, logdet = jax.vmap(ge._spd_inverse)(jnp.asarray(a, jnp.float32))
  np.testing.assert_allclose(inv, np.linalg.inv(a), rtol=2e-3, atol=2e-3)
  np.testing.assert_allclose(logdet, np.linalg.slogdet(a)[1], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", list(OPS))
def test_operator_matrix_is_the_operator(name):
  op = OPS[name]
  _, _, x = _problem(n=3)
  _, omega = _observe(op, x)
  mats = ge.operator_matrix(op, SHAPE, omega if omega else None)
  for i in range(3):
    a = _matrix_by_basis(op, _example(omega, i))
    np.testing.assert_allclose(mats[i] if omega else mats, a, atol=1e-6)
    # And it is the operator: A x == op.apply(x).
    ax = np.asarray(op.apply(jnp.asarray(x[i:i + 1]), jax.tree.map(lambda v: v[i:i + 1], omega)))
    np.testing.assert_allclose(a @ x[i].reshape(-1), ax.reshape(-1), atol=1e-5)


@pytest.mark.parametrize("rank", [None, 3])
@pytest.mark.parametrize("name", list(OPS))
def test_posterior_matches_information_form(name, rank):
  """m_i, P_i and log N(y_i; A_i μ, S_i) against float64 solves of the information form."""
  op = OPS[name]
  rng = np.random.default_rng(1)
  mu, sigma, fit = _random_fit(rng, rank)
  _, _, x = _problem(seed=2, n=6)
  y, omega = _observe(op, x, seed=3)
  mean = np.asarray(ge.posterior_mean(fit, op, y, omega)).reshape(6, D)
  ll = np.asarray(ge.log_likelihood(fit, op, y, omega))
  m_dense, p_dense = ge.posterior_moments(fit, op, y, omega)
  for i in range(6):
    a = _matrix_by_basis(op, _example(omega, i))
    yi = np.asarray(y[i], np.float64).reshape(-1)
    m_ref, p_ref = _info_form(mu, sigma, a, yi, op.sigma_y)
    np.testing.assert_allclose(mean[i], m_ref, atol=2e-4)
    np.testing.assert_allclose(m_dense[i], m_ref, atol=2e-4)
    np.testing.assert_allclose(p_dense[i], p_ref, atol=2e-4)
    np.testing.assert_allclose(ll[i], _obs_loglik(mu, sigma, a, yi, op.sigma_y),
                               rtol=1e-4, atol=2e-3)


@pytest.mark.parametrize("name", ["denoise", "inpaint_random", "inpaint_box"])
def test_factor_posterior_matches_joint_gaussian(name):
  """The low-rank E-step's (z, x) posterior against conditioning the joint Gaussian
  of (z, x, y) in float64: z ~ N(0, I), x = μ + Uz + e, y = Ax + σε."""
  op = OPS[name]
  rng = np.random.default_rng(4)
  mu, _, fit = _random_fit(rng, 3)
  u, d = np.asarray(fit.factor, np.float64), np.asarray(fit.diag, np.float64)
  _, _, x = _problem(seed=5, n=5)
  y, omega = _observe(op, x, seed=6)
  a_diag = jax.vmap(lambda o: ge._diagonal_entries(op, o, SHAPE))(omega) if omega else \
      jnp.ones((5, D))
  post = ge._factor_posterior(jnp.asarray(mu, jnp.float32), fit.factor, fit.diag,
                              y.reshape(5, D), a_diag, op.sigma_y**2)
  r = u.shape[1]
  for i in range(5):
    a = _matrix_by_basis(op, _example(omega, i))
    rows = np.any(a != 0, axis=1)
    ao = a[rows]
    # Joint prior of v = (z, x): mean (0, μ), covariance [[I, Uᵀ], [U, UUᵀ + D]].
    cov_v = np.block([[np.eye(r), u.T], [u, u @ u.T + np.diag(d)]])
    mean_v = np.concatenate([np.zeros(r), mu])
    h = np.concatenate([np.zeros((ao.shape[0], r)), ao], axis=1)
    s = h @ cov_v @ h.T + op.sigma_y**2 * np.eye(ao.shape[0])
    gain = cov_v @ h.T @ np.linalg.inv(s)
    yo = np.asarray(y[i], np.float64).reshape(-1)[rows]
    m = mean_v + gain @ (yo - h @ mean_v)
    c = cov_v - gain @ h @ cov_v
    np.testing.assert_allclose(post["z_mean"][i], m[:r], atol=2e-4)
    np.testing.assert_allclose(post["z_cov"][i], c[:r, :r], atol=2e-4)
    np.testing.assert_allclose(post["x_mean"][i], m[r:], atol=2e-4)
    np.testing.assert_allclose(post["x_var"][i], np.diagonal(c[r:, r:]), atol=2e-4)
    xz = np.asarray(post["s"][i])[:, None] * np.asarray(post["uc"][:, i])
    np.testing.assert_allclose(xz, c[r:, :r], atol=2e-4)


# --------------------------------------------------------------------------
# EM.
# --------------------------------------------------------------------------


@pytest.mark.parametrize("rank", [None, 3])
@pytest.mark.parametrize("name", list(OPS))
def test_em_loglik_never_decreases(name, rank):
  op = OPS[name]
  _, _, x = _problem(seed=7, n=1024)
  y, omega = _observe(op, x)
  fit = ge.fit(op, y, omega, num_iters=25, rank=rank)
  ll = fit.loglik
  assert ll.shape == (26,) and np.all(np.isfinite(ll))
  # float32 E-steps: allow rounding-sized dips (≈ 1e-6 relative), nothing more.
  tol = 2e-6 * np.abs(ll[:-1]) + 1e-2
  assert np.all(np.diff(ll) >= -tol), np.diff(ll)
  assert ll[-1] - ll[0] > 0.5 * x.shape[0]  # it did climb


def test_denoise_closed_form_is_the_fixed_point():
  """For A = I the MLE is μ = ȳ, Σ = (C_y − σ²I)₊; it is an EM fixed point (also where
  the clipping is active), and EM converges to it."""
  op = OPS["denoise"]
  rng = np.random.default_rng(8)
  # Rank-deficient Σ: C_y − σ²I then has negative eigenvalues, which the MLE clips.
  b = rng.standard_normal((D, 10))
  sigma = 0.02 * b @ b.T
  x = (rng.standard_normal((4096, D)) @ np.linalg.cholesky(sigma + 1e-9 * np.eye(D)).T)
  y, _ = _observe(op, x.reshape((-1,) + SHAPE).astype(np.float32))
  mle = ge.denoise_mle(y, op.sigma_y)
  assert np.linalg.eigvalsh(np.asarray(mle.cov, np.float64)).min() > -1e-6
  assert np.sum(np.linalg.eigvalsh(np.asarray(mle.cov, np.float64)) < 1e-6) >= 3  # clipped
  one = ge.fit(op, y, num_iters=1, init=mle)
  scale = np.linalg.norm(np.asarray(mle.cov))
  assert np.linalg.norm(np.asarray(one.cov) - np.asarray(mle.cov)) < 1e-4 * scale
  np.testing.assert_allclose(one.mean, mle.mean, atol=1e-5)
  assert abs(one.loglik[1] - one.loglik[0]) < 1e-5 * abs(one.loglik[0]) + 1e-2

  # Convergence from the default start, for a Σ whose eigenvalues are ≥ σ² (EM's rate in a
  # direction of variance λ is σ²/(λ + σ²), so these converge geometrically).
  sigma = _random_cov(rng, scale=0.1, ridge=0.3)
  x = rng.standard_normal((4096, D)) @ np.linalg.cholesky(sigma).T
  y, _ = _observe(op, x.reshape((-1,) + SHAPE).astype(np.float32))
  mle = ge.denoise_mle(y, op.sigma_y)
  em = ge.fit(op, y, num_iters=60)
  err = np.linalg.norm(np.asarray(em.cov) - np.asarray(mle.cov))
  assert err < 1e-3 * np.linalg.norm(np.asarray(mle.cov)), err
  np.testing.assert_allclose(em.mean, mle.mean, atol=1e-4)


def _floor_and_error(fit, sigma, x):
  xc = x.reshape(x.shape[0], -1).astype(np.float64)
  floor = np.linalg.norm(np.cov(xc.T, bias=True) - sigma)
  return floor, np.linalg.norm(np.asarray(fit.covariance(), np.float64) - sigma)


@pytest.mark.parametrize("name,iters", [("denoise", 40), ("inpaint_random", 40)])
def test_recovers_covariance_near_sampling_floor(name, iters):
  """From 4096 corrupted draws of N(μ, Σ) (σ_y 0.1 for denoising; 30 % of pixels dropped,
  σ_y 0.05, for masks), ‖Σ̂ − Σ‖_F ≤ 1.5 × the clean-data floor, while the naive covariance of
  A⁺y is far off."""
  op = OPS[name]
  mu, sigma, x = _problem(seed=9, n=4096)
  y, omega = _observe(op, x)
  fit = ge.fit(op, y, omega, num_iters=iters)
  floor, err = _floor_and_error(fit, sigma, x)
  assert err <= 1.5 * floor, (err, floor)
  naive = np.cov(np.asarray(op.pinv(y, omega), np.float64).reshape(len(x), -1).T)
  assert np.linalg.norm(naive - sigma) > 1.5 * floor
  np.testing.assert_allclose(np.asarray(fit.mean).reshape(-1), mu, atol=0.03)


@pytest.mark.parametrize("name", ["denoise", "inpaint_random"])
def test_lowrank_agrees_with_dense_on_lowrank_truth(name):
  """True Σ = UUᵀ + diag(d) with rank 2: the rank-2 fit reaches the dense fit's accuracy,
  and both restore alike."""
  op = OPS[name]
  _, sigma, x = _problem(seed=10, n=4096, lowrank=2)
  y, omega = _observe(op, x)
  dense = ge.fit(op, y, omega, num_iters=40)
  low = ge.fit(op, y, omega, num_iters=200, rank=2)
  floor, err_dense = _floor_and_error(dense, sigma, x)
  _, err_low = _floor_and_error(low, sigma, x)
  assert err_low <= 1.5 * floor and err_dense <= 1.5 * floor, (err_low, err_dense, floor)
  diff = np.linalg.norm(np.asarray(low.covariance()) - np.asarray(dense.covariance()))
  assert diff <= floor, (diff, floor)
  m_dense = np.asarray(ge.posterior_mean(dense, op, y[:256], _example(omega, slice(0, 256))))
  m_low = np.asarray(ge.posterior_mean(low, op, y[:256], _example(omega, slice(0, 256))))
  mse = lambda m: np.mean(np.square(m - x[:256]))
  assert abs(mse(m_low) - mse(m_dense)) < 0.05 * mse(m_dense)


@pytest.mark.parametrize("rank", [None, 3])
@pytest.mark.parametrize("name", ["denoise", "inpaint_random"])
def test_sharded_fit_matches_single_device(name, rank):
  """A 4-device "data" mesh (conftest fakes 4 CPUs) and N = 1000 (padded) give the
  single-device fit."""
  devices = jax.devices()
  if len(devices) < 2:
    pytest.skip("needs several devices")
  op = OPS[name]
  _, _, x = _problem(seed=11, n=1000)
  y, omega = _observe(op, x)
  mesh = jax.make_mesh((len(devices),), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  one = ge.fit(op, y, omega, num_iters=5, rank=rank, batch_size=64)
  many = ge.fit(op, y, omega, num_iters=5, rank=rank, batch_size=64, mesh=mesh)
  np.testing.assert_allclose(many.loglik, one.loglik, rtol=1e-5)
  np.testing.assert_allclose(many.covariance(), one.covariance(), atol=1e-5)
  np.testing.assert_allclose(many.mean, one.mean, atol=1e-5)


# --------------------------------------------------------------------------
# Sampling.
# --------------------------------------------------------------------------


@pytest.mark.parametrize("rank", [None, 3])
def test_prior_and_posterior_samples_have_the_right_moments(rank):
  rng = np.random.default_rng(12)
  mu, sigma, fit = _random_fit(rng, rank)
  n = 20000
  xs = np.asarray(ge.sample(fit, jax.random.key(0), n), np.float64).reshape(n, D)
  assert xs.shape == (n, D)
  np.testing.assert_allclose(xs.mean(0), mu, atol=0.02)
  np.testing.assert_allclose(np.cov(xs.T), sigma, atol=0.03 * np.abs(sigma).max())

  # One observation, repeated: posterior samples scatter as N(m, P) (Matheron's rule).
  op = OPS["inpaint_random"]
  _, _, x = _problem(seed=13, n=1)
  y1, om1 = _observe(op, x)
  y = jnp.repeat(y1, n, axis=0)
  omega = jax.tree.map(lambda a: jnp.repeat(a, n, axis=0), om1)
  ps = np.asarray(ge.posterior_sample(fit, op, y, omega, jax.random.key(1)),
                  np.float64).reshape(n, D)
  m, p = ge.posterior_moments(fit, op, y1, om1)
  np.testing.assert_allclose(ps.mean(0), m[0], atol=0.02)
  np.testing.assert_allclose(np.cov(ps.T), p[0], atol=0.03 * np.abs(sigma).max())


def test_rejects_noise_free_and_unsupported():
  _, _, x = _problem(n=8)
  with pytest.raises(ValueError, match="sigma_y"):
    ge.fit(operators.Denoise(sigma_y=0.0), jnp.asarray(x))
  with pytest.raises(ValueError, match="rank"):
    ge.fit(OPS["denoise"], jnp.asarray(x), rank=D + 1)


@pytest.mark.parametrize("name,rank", [("denoise", None), ("denoise", 3), ("blur", None),
                                       ("inpaint_random", 3), ("inpaint_box", 3)])
def test_restorer_is_the_posterior_mean_and_jits(name, rank):
  """`restore(restorer(fit))`, the flows' warm-start base, equals the information-form
  posterior mean, under jit, with params of the shapes `restorer_shapes` promises."""
  op = OPS[name]
  mu, sigma, fit = _random_fit(np.random.default_rng(3), rank)
  _, _, x = _problem(seed=4, n=6)
  y, omega = _observe(op, x)
  params = ge.restorer(fit, op)
  shapes = ge.restorer_shapes(op, SHAPE, rank)
  assert {k: (v.shape, v.dtype) for k, v in params.items()} == {
      k: (s.shape, s.dtype) for k, s in shapes.items()}
  restored = np.asarray(jax.jit(lambda p, yy, om: ge.restore(p, op, yy, om))(params, y, omega))
  for i in range(x.shape[0]):
    a = _matrix_by_basis(op, _example(omega, i))
    m, _ = _info_form(mu, sigma, a, np.asarray(y[i], np.float64).reshape(-1), op.sigma_y)
    np.testing.assert_allclose(restored[i].reshape(-1), m, atol=2e-4, rtol=1e-3)


def test_restorer_refuses_a_dense_fit_of_per_example_masks():
  with pytest.raises(NotImplementedError, match="needs a low-rank fit"):
    ge.restorer_shapes(OPS["inpaint_random"], SHAPE, None)
