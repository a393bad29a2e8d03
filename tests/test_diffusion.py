"""Properties of the VP schedule, forward process, DSM loss and samplers.

The sampler tests use Gaussian data x ~ N(mu, diag s^2), whose optimal
epsilon prediction is analytic, so each sampler must reproduce mu and s.
"""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from flowdiff_jax import diffusion

KINDS = ("linear", "cosine")


def _schedule(kind):
  return diffusion.VPSchedule(kind=kind)


# ---------------------------------------------------------------- schedule


@pytest.mark.parametrize("kind", KINDS)
def test_log_snr_strictly_decreasing_and_finite(kind):
  sched = _schedule(kind)
  t = jnp.linspace(sched.t_min, 1.0, 2001)
  lam = np.asarray(sched.log_snr(t))
  assert np.all(np.isfinite(lam))
  assert np.all(np.diff(lam) < 0)
  # The ends of the range used in training/sampling: nearly clean, nearly noise.
  assert lam[0] > 8.0 and lam[-1] < -9.0
  # Works on any shape.
  assert sched.log_snr(jnp.full((2, 3), 0.5)).shape == (2, 3)


@pytest.mark.parametrize("kind", KINDS)
def test_alpha_sigma_variance_preserving(kind):
  sched = _schedule(kind)
  t = jnp.linspace(sched.t_min, 1.0, 501).reshape(3, 167)
  alpha, sigma = sched.alpha_sigma(t)
  assert alpha.shape == sigma.shape == t.shape
  np.testing.assert_allclose(alpha**2 + sigma**2, 1.0, atol=1e-6)
  assert np.all(np.asarray(alpha) > 0) and np.all(np.asarray(sigma) > 0)
  np.testing.assert_allclose(
      jnp.log(alpha**2 / sigma**2), sched.log_snr(t), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", KINDS)
def test_dlog_snr_dt_matches_autodiff_and_finite_differences(kind):
  sched = _schedule(kind)
  t = jnp.linspace(0.01, 0.99, 99)
  d = sched.dlog_snr_dt(t)
  assert d.shape == t.shape and np.all(np.asarray(d) < 0)
  d_ad = jax.vmap(jax.grad(sched.log_snr))(t)
  np.testing.assert_allclose(d, d_ad, rtol=1e-4)
  h = 1e-3
  d_fd = (sched.log_snr(t + h) - sched.log_snr(t - h)) / (2 * h)
  np.testing.assert_allclose(d, d_fd, rtol=1e-2)


def test_linear_schedule_matches_discrete_ddpm():
  sched = diffusion.VPSchedule(kind="linear", beta_min=1e-4, beta_max=0.02,
                               num_timesteps=1000)
  betas = np.linspace(1e-4, 0.02, 1000, dtype=np.float64)
  alphas_cumprod = np.cumprod(1.0 - betas)
  t = np.arange(1, 1001) / 1000.0
  alpha, _ = sched.alpha_sigma(jnp.asarray(t, jnp.float32))
  np.testing.assert_allclose(np.asarray(alpha)**2, alphas_cumprod, atol=2e-3)
  # Also in log-SNR, which is what the sampler and ELBO weights see.
  np.testing.assert_allclose(
      sched.log_snr(t), np.log(alphas_cumprod / (1 - alphas_cumprod)), atol=0.15)


def test_cosine_schedule_matches_nichol_dhariwal():
  sched = diffusion.VPSchedule(kind="cosine", cosine_s=0.008)
  f = lambda t: np.cos((t + 0.008) / 1.008 * np.pi / 2)**2
  t = np.linspace(0.001, 0.99, 500)
  alpha, _ = sched.alpha_sigma(jnp.asarray(t, jnp.float32))
  np.testing.assert_allclose(np.asarray(alpha)**2, f(t) / f(0), atol=2e-3)


def test_make_schedule_from_config_and_validation():
  cfg = ml_collections.ConfigDict(
      dict(kind="cosine", beta_min=1e-4, beta_max=0.02, num_timesteps=500,
           cosine_s=0.01, t_min=2e-3))
  sched = diffusion.make_schedule(cfg)
  assert sched == diffusion.VPSchedule("cosine", 1e-4, 0.02, 500, 0.01, 2e-3)
  # Missing fields take the defaults; the schedule is hashable (jit-static).
  assert diffusion.make_schedule(ml_collections.ConfigDict()) == (
      diffusion.VPSchedule())
  hash(sched)
  with pytest.raises(ValueError, match="kind"):
    diffusion.VPSchedule(kind="quadratic")


# ------------------------------------------------------- forward process, loss


def test_q_sample_moments():
  sched = _schedule("linear")
  n = 20000
  x = jnp.full((n, 2, 2, 1), 0.7)
  t = jnp.full((n,), 0.3)
  eps = jax.random.normal(jax.random.key(0), x.shape)
  x_t = diffusion.q_sample(sched, x, t, eps)
  alpha, sigma = sched.alpha_sigma(0.3)
  np.testing.assert_allclose(x_t.mean(0), 0.7 * alpha, atol=4 * sigma / n**0.5)
  np.testing.assert_allclose(x_t.std(0), sigma, rtol=0.03)


def _gaussian_problem(seed=0, shape=(4, 4, 1)):
  rng = np.random.default_rng(seed)
  mu = jnp.asarray(rng.uniform(-0.5, 0.5, shape), jnp.float32)
  s = jnp.asarray(rng.uniform(0.1, 0.5, shape), jnp.float32)
  return mu, s


def _optimal_eps_fn(sched, mu, s):
  """E[eps | x_t] for x ~ N(mu, diag s^2).

  It is sigma_t (x_t - alpha_t mu) / (alpha_t^2 s^2 + sigma_t^2).
  """

  def eps_fn(x_t, t):
    alpha, sigma = sched.alpha_sigma(t)
    alpha, sigma = alpha[:, None, None, None], sigma[:, None, None, None]
    return sigma * (x_t - alpha * mu) / (alpha**2 * s**2 + sigma**2)

  return eps_fn


def test_dsm_loss_zero_for_oracle_and_shape():
  sched = _schedule("linear")
  x = jax.random.uniform(jax.random.key(1), (8, 4, 4, 2), minval=-1, maxval=1)

  def oracle(x_t, t):  # knows x, hence recovers eps exactly
    alpha, sigma = sched.alpha_sigma(t)
    return (x_t - alpha[:, None, None, None] * x) / sigma[:, None, None, None]

  loss = diffusion.dsm_loss(oracle, sched, x, jax.random.key(2))
  assert loss.shape == (8,)
  np.testing.assert_allclose(loss, 0.0, atol=1e-6)
  # A zero predictor's loss is E||eps||^2 per dim, i.e. about 1.
  zero = diffusion.dsm_loss(lambda x_t, t: jnp.zeros_like(x_t), sched, x,
                            jax.random.key(2))
  assert 0.7 < float(zero.mean()) < 1.3


@pytest.mark.parametrize("kind", KINDS)
def test_dsm_loss_minimised_by_analytic_eps(kind):
  sched = _schedule(kind)
  mu, s = _gaussian_problem()
  x = mu + s * jax.random.normal(jax.random.key(3), (4096,) + mu.shape)
  eps_opt = _optimal_eps_fn(sched, mu, s)
  rng = jax.random.key(4)  # same t and eps draws for every predictor
  loss = lambda fn: float(diffusion.dsm_loss(fn, sched, x, rng).mean())
  best = loss(eps_opt)
  assert best < 0.5  # well below the zero predictor's ~1
  for worse in (lambda x_t, t: 1.1 * eps_opt(x_t, t),
                lambda x_t, t: 0.9 * eps_opt(x_t, t),
                lambda x_t, t: eps_opt(x_t, t) + 0.05):
    assert loss(worse) > best + 1e-4


# ------------------------------------------------------------------ samplers


@functools.partial(jax.jit, static_argnums=(0, 1, 2), static_argnames=(
    "sampler", "num_steps", "clip"))
def _jit_sample(eps_fn, sched, shape, rng, **kw):
  return diffusion.sample(eps_fn, sched, rng, shape, **kw)


# Steps per sampler: the t grid is uniform, so its last step is large in
# log-SNR and first-order samplers need many steps; Heun needs few.
SAMPLER_STEPS = {"ancestral": 1000, "ddim": 300, "heun": 100}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("sampler", sorted(SAMPLER_STEPS))
def test_sampler_reproduces_gaussian(kind, sampler):
  sched = _schedule(kind)
  mu, s = _gaussian_problem()
  n = 3000
  x = _jit_sample(_optimal_eps_fn(sched, mu, s), sched, (n,) + mu.shape,
                  jax.random.key(7), sampler=sampler,
                  num_steps=SAMPLER_STEPS[sampler], clip=False)
  x = np.asarray(x)
  assert x.shape == (n,) + mu.shape and np.all(np.isfinite(x))
  # Sampling error of the mean is s/sqrt(n) = 0.018 s; of the std, 1.3 %.
  # Max over 16 pixels, plus the samplers' discretisation bias.
  mean_err = np.abs(x.mean(0) - mu) / s
  std_ratio = x.std(0) / s
  assert mean_err.max() < 0.08, mean_err.max()
  assert np.abs(std_ratio - 1).max() < 0.08, std_ratio
  assert abs(std_ratio.mean() - 1) < 0.03, std_ratio.mean()


def _chain_moments(sched, mu, s, sampler, num_steps):
  """Exact mean/var of a coarse ancestral/DDIM chain on Gaussian data.

  With the analytic eps every step is affine in x_t (plus Gaussian noise),
  so moments propagate in closed form. Written with DDPM's textbook
  posterior q(x_s | x_t, x0) coefficients, independently of the sampler code.
  """
  mu, s = np.asarray(mu, np.float64), np.asarray(s, np.float64)
  ts = np.linspace(1.0, sched.t_min, num_steps + 1).astype(np.float32)
  a_all, s_all = (np.asarray(v, np.float64) for v in sched.alpha_sigma(ts))
  m, v = np.zeros_like(mu), np.ones_like(mu)  # x_1 ~ N(0, I)

  def x0_coeffs(a_t, s_t):  # x0_hat = g x_t + g0
    d = a_t**2 * s**2 + s_t**2
    k, k0 = s_t / d, -s_t * a_t * mu / d  # eps_hat = k x_t + k0
    return (1 - s_t * k) / a_t, -s_t * k0 / a_t, k, k0

  for i in range(num_steps):
    a_t, s_t, a_s, s_s = a_all[i], s_all[i], a_all[i + 1], s_all[i + 1]
    g, g0, k, k0 = x0_coeffs(a_t, s_t)
    if sampler == "ancestral":
      a_ts = a_t / a_s
      beta = s_t**2 - a_ts**2 * s_s**2
      p, q = a_s * beta / s_t**2, a_ts * s_s**2 / s_t**2
      coef, off, noise_var = p * g + q, p * g0, beta * s_s**2 / s_t**2
    else:  # ddim
      coef, off, noise_var = a_s * g + s_s * k, a_s * g0 + s_s * k0, 0.0
    m, v = coef * m + off, coef**2 * v + noise_var
  g, g0, _, _ = x0_coeffs(a_all[-1], s_all[-1])
  return g * m + g0, g**2 * v


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("sampler", ["ancestral", "ddim"])
def test_coarse_chain_matches_closed_form_moments(kind, sampler):
  """Checks each step's formulas, not just their many-step limit."""
  sched = _schedule(kind)
  mu, s = _gaussian_problem()
  n = 4000
  x = np.asarray(_jit_sample(
      _optimal_eps_fn(sched, mu, s), sched, (n,) + mu.shape, jax.random.key(5),
      sampler=sampler, num_steps=8, clip=False), np.float64)
  mean, var = _chain_moments(sched, mu, s, sampler, 8)
  assert np.all(np.abs(x.mean(0) - mean) < 5 * np.sqrt(var / n))
  np.testing.assert_allclose(x.std(0), np.sqrt(var), rtol=0.06)
  # Coarse chains are visibly off the data distribution: the check is sharp.
  assert np.abs(np.sqrt(var) / np.asarray(s) - 1).max() > 0.1


def test_heun_is_more_accurate_than_ddim_at_equal_steps():
  sched = _schedule("linear")
  mu, s = _gaussian_problem()
  eps_fn = _optimal_eps_fn(sched, mu, s)
  err = {}
  for sampler in ("ddim", "heun"):
    x = _jit_sample(eps_fn, sched, (2000,) + mu.shape, jax.random.key(8),
                    sampler=sampler, num_steps=25, clip=False)
    err[sampler] = float(np.abs(np.asarray(x).std(0) / s - 1).mean())
  assert err["heun"] < 0.5 * err["ddim"], err


@pytest.mark.parametrize("sampler", sorted(SAMPLER_STEPS))
def test_clip_bounds_output(sampler):
  sched = _schedule("linear")
  mu = jnp.full((2, 2, 1), 1.5)  # data outside [-1, 1]
  s = jnp.full((2, 2, 1), 0.5)
  x = _jit_sample(_optimal_eps_fn(sched, mu, s), sched, (64, 2, 2, 1),
                  jax.random.key(9), sampler=sampler, num_steps=10, clip=True)
  assert float(x.max()) <= 1.0 and float(x.min()) >= -1.0
  assert float(x.max()) == 1.0


@pytest.mark.parametrize("sampler", ["ancestral", "ddim"])
def test_clip_is_a_no_op_when_x0_stays_in_range(sampler):
  sched = _schedule("linear")
  mu, s = jnp.zeros((2, 2, 1)), jnp.full((2, 2, 1), 0.1)  # |x0_hat| << 1
  eps_fn = _optimal_eps_fn(sched, mu, s)
  run = lambda clip: _jit_sample(eps_fn, sched, (64, 2, 2, 1),
                                 jax.random.key(3), sampler=sampler,
                                 num_steps=10, clip=clip)
  np.testing.assert_allclose(run(True), run(False), rtol=1e-5, atol=1e-6)


def test_ddim_is_deterministic_given_rng():
  sched = _schedule("linear")
  mu, s = _gaussian_problem()
  eps_fn = _optimal_eps_fn(sched, mu, s)
  a = _jit_sample(eps_fn, sched, (4,) + mu.shape, jax.random.key(1),
                  sampler="ddim", num_steps=5)
  b = _jit_sample(eps_fn, sched, (4,) + mu.shape, jax.random.key(1),
                  sampler="ddim", num_steps=5)
  c = _jit_sample(eps_fn, sched, (4,) + mu.shape, jax.random.key(2),
                  sampler="ddim", num_steps=5)
  np.testing.assert_array_equal(a, b)
  assert not np.allclose(a, c)


def test_invalid_sampler_raises():
  sched = _schedule("linear")
  with pytest.raises(ValueError, match="ancestral.*ddim.*heun"):
    diffusion.sample(lambda x, t: x, sched, jax.random.key(0), (1, 2, 2, 1),
                     sampler="euler")


# ---------------------------------------------------------------- NLL bound


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.slow
def test_nll_bound_is_tight_for_the_exact_gaussian_score(kind):
  """With the analytic eps of x ~ N(mu, diag s^2), E_x[bound] = E_x[-log p(x)] up to the
  decoder's noise (variance e^{-lambda(t_min)}, ~1e-4 here) and Monte-Carlo error.

  Tolerance: 0.02 nats per dimension on 512 images x 8 time draws.
  """
  sched = _schedule(kind)
  mu, s = _gaussian_problem()
  x = mu + s * jax.random.normal(jax.random.key(3), (512, *mu.shape))
  bound = jax.jit(lambda x, k: diffusion.nll_bound(_optimal_eps_fn(sched, mu, s), sched, x, k,
                                                   num_time_samples=8))(x, jax.random.key(4))
  true_nll = jnp.sum(0.5 * ((x - mu) / s)**2 + jnp.log(s) + 0.5 * np.log(2 * np.pi),
                     axis=(1, 2, 3))
  dims = mu.size
  gap = float(jnp.mean(bound - true_nll)) / dims
  assert abs(gap) < 0.02, gap
  # A wrong score is a worse model: its bound is clearly larger.
  wrong = diffusion.nll_bound(_optimal_eps_fn(sched, mu + 0.3, s), sched, x, jax.random.key(4),
                              num_time_samples=8)
  assert float(jnp.mean(wrong - true_nll)) / dims > gap + 0.1


@pytest.mark.slow
def test_nll_bound_gradient_in_x_points_to_the_score():
  """d bound / dx averages to -grad log p(x) = (x - mu) / s^2 for the exact score."""
  sched = _schedule("linear")
  mu, s = _gaussian_problem()
  x = mu + s * jax.random.normal(jax.random.key(5), (4, *mu.shape))
  grad = jax.jit(jax.grad(lambda x, k: jnp.sum(diffusion.nll_bound(
      _optimal_eps_fn(sched, mu, s), sched, x, k, num_time_samples=4096))))(x, jax.random.key(6))
  np.testing.assert_allclose(grad, (x - mu) / s**2, rtol=0.1, atol=0.5)


@pytest.mark.parametrize("kind", KINDS)
def test_t_from_log_snr_inverts_log_snr(kind):
  sched = _schedule(kind)
  t = jnp.linspace(sched.t_min, 1.0, 257)
  np.testing.assert_allclose(sched.t_from_log_snr(sched.log_snr(t)), t, rtol=1e-3, atol=1e-5)


def _true_gaussian_nll(x, mu, s):
  return jnp.sum(0.5 * ((x - mu) / s)**2 + jnp.log(s) + 0.5 * np.log(2 * np.pi), axis=(1, 2, 3))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.slow
def test_nll_bound_uniform_time_sampling_is_unbiased(kind):
  """t ~ U(t_min, 1) with weight (1 - t_min)|lambda'(t)| estimates the same bound.

  Its weight grows like 1/t near t = 0: per draw the estimate's std is about
  20 nats per dimension here (about 4.5 with log-SNR sampling), so this uses
  2^21 draws (2048 images x 1024 times) on 2x2x1 images: standard error about
  0.016 nats per dimension; tolerance 0.06.
  """
  sched = _schedule(kind)
  mu, s = _gaussian_problem(shape=(2, 2, 1))
  x = mu + s * jax.random.normal(jax.random.key(3), (2048, *mu.shape))
  bound = jax.jit(lambda x, k: diffusion.nll_bound(
      _optimal_eps_fn(sched, mu, s), sched, x, k, num_time_samples=1024,
      time_sampling="uniform"))(x, jax.random.key(4))
  gap = float(jnp.mean(bound - _true_gaussian_nll(x, mu, s))) / mu.size
  assert abs(gap) < 0.06, gap


def _replicate_draws(sched, x, rng, num_time_samples, time_sampling):
  """The (t, weight, eps) of each of nll_bound's draws, from the same key splits."""
  lam_max, lam_1 = sched.log_snr(sched.t_min), sched.log_snr(1.0)
  draws = []
  for key in jax.random.split(rng, num_time_samples):
    time_key, eps_key = jax.random.split(key)
    if time_sampling == "log_snr":
      lam = jax.random.uniform(time_key, x.shape[:1], jnp.float32, lam_1, lam_max)
      t = sched.t_from_log_snr(lam)
      weight = jnp.full(x.shape[:1], lam_max - lam_1)
    else:
      t = jax.random.uniform(time_key, x.shape[:1], jnp.float32, sched.t_min, 1.0)
      weight = (1.0 - sched.t_min) * -sched.dlog_snr_dt(t)
    draws.append((t, weight, jax.random.normal(eps_key, x.shape, x.dtype)))
  return draws


def _bound_and_grad(eps_fn, sched, x, rng, **kw):
  return jax.jit(jax.vmap(jax.value_and_grad(lambda x, k: jnp.sum(
      diffusion.nll_bound(eps_fn, sched, x[None], k, **kw))), in_axes=(0, 0)))(
          x, jax.random.split(rng, x.shape[0]))


@pytest.mark.parametrize("time_sampling", diffusion.TIME_SAMPLINGS)
def test_sds_gradient_is_exact_for_standard_normal_data(time_sampling):
  """For N(0, I) data eps_hat = sigma_t z_t, so J = sigma_t I and "sds" drops nothing:
  value and x-gradient equal the exact ones draw by draw (one draw per image)."""
  sched = _schedule("linear")
  x = jax.random.normal(jax.random.key(1), (16, 2, 2, 2))
  eps_fn = lambda x_t, t: sched.alpha_sigma(t)[1][:, None, None, None] * x_t
  kw = dict(num_time_samples=1, time_sampling=time_sampling)
  value, grad = _bound_and_grad(eps_fn, sched, x, jax.random.key(2), gradient="exact", **kw)
  value_sds, grad_sds = _bound_and_grad(eps_fn, sched, x, jax.random.key(2), gradient="sds", **kw)
  # Same arithmetic, compiled into other fusions: equal to rounding.
  np.testing.assert_allclose(value_sds, value, rtol=1e-6, atol=1e-5)
  scale = float(jnp.max(jnp.abs(grad)))
  np.testing.assert_allclose(grad_sds, grad, rtol=1e-5, atol=1e-6 * scale)


@pytest.mark.parametrize("time_sampling", diffusion.TIME_SAMPLINGS)
@pytest.mark.slow
def test_sds_gradient_matches_its_closed_form_and_differs_from_exact(time_sampling):
  """Sigma = diag(0.1 ... 2): the sds x-gradient is mean_draws[w alpha sigma (eps_hat - eps)]
  + alpha_1^2 x (prior term), from the same draws; the exact gradient differs."""
  sched = _schedule("linear")
  shape = (2, 2, 2)
  mu = jnp.asarray(np.linspace(-0.3, 0.3, 8).reshape(shape), jnp.float32)
  s = jnp.asarray(np.sqrt(np.linspace(0.1, 2.0, 8)).reshape(shape), jnp.float32)
  x = mu + s * jax.random.normal(jax.random.key(5), (4, *shape))
  eps_fn = _optimal_eps_fn(sched, mu, s)
  rng, num = jax.random.key(6), 3
  kw = dict(num_time_samples=num, time_sampling=time_sampling)
  bound = lambda x, gradient: jnp.sum(diffusion.nll_bound(
      eps_fn, sched, x, rng, gradient=gradient, **kw))
  value, grad = jax.jit(jax.value_and_grad(bound), static_argnums=1)(x, "exact")
  value_sds, grad_sds = jax.jit(jax.value_and_grad(bound), static_argnums=1)(x, "sds")
  np.testing.assert_allclose(value_sds, value, rtol=1e-6, atol=1e-5)

  @jax.jit
  def closed_form(x):
    alpha_1, _ = sched.alpha_sigma(1.0)
    out = alpha_1**2 * x  # the prior term's exact gradient
    for t, weight, eps in _replicate_draws(sched, x, rng, num, time_sampling):
      alpha, sigma = (v[:, None, None, None] for v in sched.alpha_sigma(t))
      eps_hat = eps_fn(alpha * x + sigma * eps, t)
      out += weight[:, None, None, None] * alpha * sigma * (eps_hat - eps) / num
    return out

  expected = closed_form(x)
  scale = float(jnp.max(jnp.abs(expected)))
  np.testing.assert_allclose(grad_sds, expected, rtol=1e-4, atol=1e-5 * scale)
  rel_diff = float(jnp.linalg.norm(grad_sds - grad) / jnp.linalg.norm(grad))
  assert rel_diff > 0.1, rel_diff


@pytest.mark.slow
def test_sds_gives_the_network_no_gradient():
  sched = _schedule("linear")
  x = jax.random.normal(jax.random.key(7), (4, 2, 2, 1))
  params = {"a": jnp.array(0.3), "b": jnp.full((2, 2, 1), 0.1)}

  def bound(params, x, gradient):
    eps_fn = lambda x_t, t: params["a"] * x_t + params["b"] * t[:, None, None, None]
    return jnp.sum(diffusion.nll_bound(eps_fn, sched, x, jax.random.key(8), num_time_samples=2,
                                       gradient=gradient))

  grad_fn = jax.jit(jax.grad(bound, argnums=(0, 1)), static_argnums=2)
  (p_exact, x_exact), (p_sds, x_sds) = grad_fn(params, x, "exact"), grad_fn(params, x, "sds")
  for g in jax.tree.leaves(p_exact):
    assert float(jnp.max(jnp.abs(g))) > 1e-3
  for g in jax.tree.leaves(p_sds):
    np.testing.assert_array_equal(g, 0.0)
  assert float(jnp.max(jnp.abs(x_sds))) > 1e-3 and float(jnp.max(jnp.abs(x_exact))) > 1e-3


def _uniform_weight(sched, t, time_sampling):
  """density of U(t_min, 1) / density of nll_bound's proposal, written out."""
  if time_sampling == "uniform":
    return jnp.ones_like(t)
  lam_range = sched.log_snr(sched.t_min) - sched.log_snr(1.0)
  return lam_range / ((1.0 - sched.t_min) * -sched.dlog_snr_dt(t))


@pytest.mark.parametrize("kind", KINDS)
def test_uniform_time_weight_turns_log_snr_draws_into_uniform_ones(kind):
  """E_{t ~ log-SNR proposal}[v(t) g(t)] = E_{t ~ U(t_min, 1)}[g(t)] for a smooth g.

  The draws are nll_bound's own (same key splits); the right side is a
  quadrature. 2^18 draws, v in [0, ~2.5]: standard error about 0.002.
  """
  sched = _schedule(kind)
  x = jnp.zeros((2**18, 1, 1, 1))
  (t, _, _), = _replicate_draws(sched, x, jax.random.key(11), 1, "log_snr")
  g = lambda t: jnp.cos(3.0 * t) + t
  v = diffusion.uniform_time_weight(sched, t, "log_snr")
  np.testing.assert_allclose(v, _uniform_weight(sched, t, "log_snr"), rtol=1e-6)
  grid = np.linspace(sched.t_min, 1.0, 200_001)
  expected = np.trapezoid(np.cos(3.0 * grid) + grid, grid) / (1.0 - sched.t_min)
  assert abs(float(jnp.mean(v * g(t))) - expected) < 0.01
  np.testing.assert_array_equal(diffusion.uniform_time_weight(sched, t, "uniform"), 1.0)


@pytest.mark.parametrize("time_sampling", diffusion.TIME_SAMPLINGS)
def test_nll_bound_and_dsm_equal_the_two_passes_with_the_same_draws(time_sampling):
  """One pass, gradient split: the values and both gradients of the two-pass form.

  The two-pass form written out: nll_bound with the network under stop_gradient
  (its x-gradient), plus the importance-weighted DSM of the network on
  stop_gradient(x) from the same (t, ε) draws (its params gradient). Each
  example's bound and DSM get their own weights, as a loss with per-example
  weights would give them, so the per-row rescaling of the z-gradient is checked.
  """
  sched = _schedule("linear")
  num = 2
  base = jax.random.normal(jax.random.key(1), (4, 2, 2, 2))
  net = lambda p, z, t, key: (jnp.tanh(p["a"] * z + p["b"] * t[:, None, None, None])
                              + p["c"] * z)
  params = {"a": jnp.array(0.7), "b": jnp.full((2, 2, 2), 0.2), "c": jnp.array(0.3)}
  flow = {"m": jnp.full((2, 2, 2), 0.1), "s": jnp.array(0.8)}
  c = jnp.array([0.5, 1.0, 2.0, 0.25])   # per-example weights of the bound
  d = jnp.array([1.0, 0.3, 0.7, 1.5])    # and of the DSM
  rng = jax.random.key(2)

  def shared(params, flow):
    x = flow["m"] + flow["s"] * base
    bound, dsm = diffusion.nll_bound_and_dsm(net, params, sched, x, rng, jax.random.key(0),
                                             num_time_samples=num, time_sampling=time_sampling)
    return jnp.sum(c * bound) + jnp.sum(d * dsm)

  def two_passes(params, flow):
    x = flow["m"] + flow["s"] * base
    frozen = jax.lax.stop_gradient(params)
    bound = diffusion.nll_bound(lambda z, t: net(frozen, z, t, None), sched, x, rng,
                                num_time_samples=num, time_sampling=time_sampling)
    x_fixed = jax.lax.stop_gradient(x)
    dsm = 0.0
    for t, _, eps in _replicate_draws(sched, x, rng, num, time_sampling):
      err = net(params, diffusion.q_sample(sched, x_fixed, t, eps), t, None) - eps
      dsm += _uniform_weight(sched, t, time_sampling) * jnp.mean(err**2, axis=(1, 2, 3)) / num
    return jnp.sum(c * bound) + jnp.sum(d * dsm)

  grad = lambda f: jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(params, flow)
  (value, grads), (ref_value, ref_grads) = grad(shared), grad(two_passes)
  np.testing.assert_allclose(value, ref_value, rtol=1e-6)
  for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads), strict=True):
    assert float(jnp.max(jnp.abs(r))) > 1e-3  # both networks get a gradient
    np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-6)


def test_nll_bound_rejects_unknown_options():
  sched = _schedule("linear")
  x = jnp.zeros((1, 2, 2, 1))
  eps_fn = lambda x_t, t: x_t
  with pytest.raises(ValueError, match=r"time_sampling.*log_snr.*uniform"):
    diffusion.nll_bound(eps_fn, sched, x, jax.random.key(0), time_sampling="linear")
  with pytest.raises(ValueError, match=r"gradient.*exact.*sds"):
    diffusion.nll_bound(eps_fn, sched, x, jax.random.key(0), gradient="reinforce")
