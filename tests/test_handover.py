"""flowdiff's prior hand-over (flowdiff.gaussian_prior_steps / handover_steps).

For the first steps the flow's prior term is the log-density of the Gaussian
fitted by EM to the observations; then it moves linearly to the jointly
trained diffusion prior. Checked here: the log-density against SciPy (dense
and low-rank fits, with the variance floor), the schedule, the loss at the
two ends and in between against the losses it interpolates, that the flow's
gradient does not see the score network while the Gaussian is the whole
prior, and that a train step holds the fitted params fixed.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from flowdiff_jax import gaussian_em, losses, operators, step as step_lib
from flowdiff_jax.configs import tiny
from flowdiff_jax.methods import base
from flowdiff_jax.validate import ConfigError, validate_config


def _spd(d, rng, scale=0.1):
  a = rng.normal(size=(d, d))
  return scale * (a @ a.T / d + 0.1 * np.eye(d))


@pytest.mark.parametrize("rank", [None, 3])
def test_log_density_matches_scipy(rank):
  rng = np.random.default_rng(0)
  shape, d = (3, 3, 1), 9
  mu = rng.normal(size=d)
  if rank is None:
    cov = _spd(d, rng)
    fit = gaussian_em.GaussianFit(mean=jnp.asarray(mu.reshape(shape), jnp.float32),
                                  cov=jnp.asarray(cov, jnp.float32))
  else:
    u, diag = 0.3 * rng.normal(size=(d, rank)), rng.uniform(0.01, 0.1, d)
    cov = u @ u.T + np.diag(diag)
    fit = gaussian_em.GaussianFit(mean=jnp.asarray(mu.reshape(shape), jnp.float32),
                                  factor=jnp.asarray(u, jnp.float32),
                                  diag=jnp.asarray(diag, jnp.float32))
  params = gaussian_em.log_density_params(fit)
  shapes = gaussian_em.log_density_shapes(shape, rank)
  assert {k: v.shape for k, v in params.items()} == {k: s.shape for k, s in shapes.items()}
  x = rng.normal(size=(5, d))
  got = gaussian_em.log_density(params, jnp.asarray(x.reshape(5, *shape), jnp.float32))
  want = stats.multivariate_normal(mu, cov).logpdf(x)
  np.testing.assert_allclose(got, want, rtol=1e-4)


def test_log_density_floors_a_singular_covariance():
  # One constant pixel (variance 0): its direction gets the floor's variance.
  cov = np.diag([0.04, 0.0, 0.09])
  fit = gaussian_em.GaussianFit(mean=jnp.zeros((1, 3, 1)), cov=jnp.asarray(cov, jnp.float32))
  params = gaussian_em.log_density_params(fit)
  x = np.array([[0.1, 0.02, -0.3]])
  floored = np.diag([0.04, gaussian_em.LOG_DENSITY_VAR_FLOOR, 0.09])
  np.testing.assert_allclose(gaussian_em.log_density(params, jnp.asarray(x.reshape(1, 1, 3, 1))),
                             stats.multivariate_normal(np.zeros(3), floored).logpdf(x),
                             rtol=1e-5)


def test_schedule_holds_then_ramps():
  obj = base.Objective(method="flowdiff", schedule=None, operator=None, ema_decay=0.0,
                       score_net=None, gaussian_prior_steps=10, handover_steps=20)
  w = [float(obj.prior_handover(jnp.int32(s))) for s in (0, 9, 10, 15, 20, 30, 100)]
  np.testing.assert_allclose(w, [0, 0, 0, 0.25, 0.5, 1, 1], atol=1e-6)
  sharp = base.Objective(method="flowdiff", schedule=None, operator=None, ema_decay=0.0,
                         score_net=None, gaussian_prior_steps=10)
  assert [float(sharp.prior_handover(jnp.int32(s))) for s in (9, 10)] == [0.0, 1.0]
  plain = base.Objective(method="flowdiff", schedule=None, operator=None, ema_decay=0.0,
                         score_net=None)
  assert not plain.gaussian_prior and float(plain.prior_handover(jnp.int32(0))) == 1.0


def _config():
  config = tiny.get_config()
  config.method = "flowdiff"
  config.operator.update(name="denoise", sigma_y=0.1)
  config.flow.base = "gaussian_em"
  config.gaussian_em.update(rank=0, num_iters=4, batch_size=32)
  config.flowdiff.update(gaussian_prior_steps=2, handover_steps=4)
  config.amortized.beta_prior_warmup_steps = 0
  return config


def _state(config, n=16):
  x = jnp.asarray(np.tanh(np.random.default_rng(0).normal(size=(n, 28, 28, 1))), jnp.float32)
  op = operators.make_operator(config.operator)
  measured = operators.corrupt(op, x, jnp.arange(n), 0)
  batch = {"y": measured.pop("y"), "omega": measured}
  fitted = base.fit_flow_base(config, lambda _: (batch["y"], batch["omega"]))
  state = step_lib.create_train_state(config, jax.random.key(0), batch, fitted_params=fitted)
  return state, batch, op


@pytest.mark.slow
def test_loss_interpolates_the_two_priors_and_skips_a_zero_term():
  config = _config()
  state, batch, op = _state(config, n=4)
  obj, params = state.objective, state.params
  fitted = params[base.GAUSSIAN_PRIOR_KEY]
  gauss = lambda x: gaussian_em.log_density(fitted, x)
  x_hat = base.flow_estimate(obj, params, batch["y"], batch["omega"])
  make_eps = lambda p, train: base.eps_fn(obj, p, train=False)
  rng = jax.random.key(3)

  def loss(flow_params, score_params, **kw):
    return losses.flowdiff_loss(obj.flow, flow_params, make_eps, score_params, obj.schedule,
                                rng, batch["y"], batch["omega"], op, x_hat=x_hat, **kw)

  _, diff_terms = loss(params["flow"], params["score"])
  # w = 0: exactly the amortized loss against the Gaussian, on the same flow draws.
  _, gauss_terms = loss(params["flow"], params["score"], gaussian_log_prob=gauss,
                        diffusion_weight=0.0)
  flow_rng = jax.random.split(rng, 3)[0]
  _, amortized = losses.amortized_flow_loss(obj.flow, params["flow"], flow_rng, batch["y"],
                                            batch["omega"], op, gauss, residual=True,
                                            x_hat=x_hat)
  np.testing.assert_allclose(gauss_terms["prior_nll"], amortized["prior_nll"], rtol=1e-5)
  assert abs(float(gauss_terms["prior_nll"] - diff_terms["prior_nll"])) > 1e-3
  # w = 1: the plain joint loss; in between, the mixture of the two prior terms.
  _, one = loss(params["flow"], params["score"], gaussian_log_prob=gauss, diffusion_weight=1.0)
  np.testing.assert_allclose(one["prior_nll"], diff_terms["prior_nll"], rtol=1e-6)
  _, mid = loss(params["flow"], params["score"], gaussian_log_prob=gauss, diffusion_weight=0.25)
  np.testing.assert_allclose(mid["prior_nll"], 0.75 * gauss_terms["prior_nll"]
                             + 0.25 * diff_terms["prior_nll"], rtol=1e-5)

  # While the Gaussian is the whole prior the flow's gradient does not see the
  # score network: the same under two different score networks (a fresh
  # U-Net's output layer is zero, so the second one is perturbed everywhere).
  def flow_grad(score_params, w):
    fn = lambda fp: loss(fp, score_params, gaussian_log_prob=gauss, diffusion_weight=w)[1][
        "flow_loss"]
    return jax.grad(fn)(params["flow"])
  leaves, treedef = jax.tree.flatten(params["score"])
  keys = jax.random.split(jax.random.key(9), len(leaves))
  other = jax.tree.unflatten(treedef, [a + 0.1 * jax.random.normal(k, a.shape)
                                       for a, k in zip(leaves, keys)])
  for a, b in zip(jax.tree.leaves(flow_grad(params["score"], 0.0)),
                  jax.tree.leaves(flow_grad(other, 0.0))):
    np.testing.assert_array_equal(a, b)
  assert any(not np.allclose(a, b) for a, b in zip(
      jax.tree.leaves(flow_grad(params["score"], 0.5)), jax.tree.leaves(flow_grad(other, 0.5))))


def test_step_holds_the_fit_and_logs_the_weight():
  config = _config()
  validate_config(config)
  state, batch, _ = _state(config)
  assert set(state.params) == {"flow", "score", "gaussian_em", "gaussian_em_prior"}
  step = jax.jit(step_lib.train_step)
  weights = []
  new = state
  for i in range(4):
    new, metrics = step(new, batch, jax.random.key(i))
    weights.append(float(metrics["train/diffusion_weight"]))
    assert np.isfinite(float(metrics["train/loss"]))
  np.testing.assert_allclose(weights, [0, 0, 0, 0.25], atol=1e-6)
  for k, v in state.params["gaussian_em_prior"].items():
    np.testing.assert_array_equal(new.params["gaussian_em_prior"][k], v)


def test_handover_needs_the_fitted_base():
  config = _config()
  config.flow.base = "pinv"
  with pytest.raises(ConfigError, match="flowdiff.gaussian_prior_steps=2: .*gaussian_em"):
    validate_config(config)
  config = _config()
  config.flowdiff.handover_steps = -1
  with pytest.raises(ConfigError, match="flowdiff.handover_steps=-1: must be an integer >= 0"):
    validate_config(config)
