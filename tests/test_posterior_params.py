"""amortized.posterior_params: which flow params draw the posterior outside training.

"params" (the default) draws with the flow's current params, "ema" with their
EMA. Checked here: "ema" gives exactly the samples of a state whose flow
params *are* the EMA, differs from "params" once the two have moved apart,
reaches the held-out metrics of eval_step (not only posterior_samples), never
changes what a training step does, and a bad value names the field. Also here
(same fixture): the held-out metrics score the prior's own Tweedie E[x | y] on denoising.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flowdiff_jax import evaluation, operators, sampling, step as step_lib
from flowdiff_jax.configs import tiny
from flowdiff_jax.validate import ConfigError, validate_config


def _config(posterior_params: str):
  config = tiny.get_config()
  config.method = "flowdiff"
  config.operator.name = "denoise"
  config.operator.sigma_y = 0.1
  config.amortized.posterior_params = posterior_params
  # A fast-moving flow and a slow EMA, so two steps separate them clearly.
  config.flow_optim.update(learning_rate=1e-2, warmup_steps=0)
  config.optim.ema_decay = 0.9
  return config


def _batch():
  x = jnp.tanh(jax.random.normal(jax.random.key(0), (8, 28, 28, 1)))
  op = operators.make_operator(_config("params").operator)
  measured = operators.corrupt(op, x, jnp.arange(8), 0)
  return {"x": x, "y": measured.pop("y"), "omega": measured}


@pytest.fixture(scope="module")
def trained():
  """(state, batch) after two steps of the "params" config."""
  config = _config("params")
  validate_config(config)
  batch = _batch()
  train_batch = {"y": batch["y"], "omega": batch["omega"]}
  state = step_lib.create_train_state(config, jax.random.key(1), train_batch)
  step = jax.jit(step_lib.train_step)
  for i in range(2):
    state, _ = step(state, train_batch, jax.random.key(2 + i))
  return state, batch


def _with(state, posterior_params):
  return state.replace(objective=dataclasses.replace(state.objective,
                                                     posterior_params=posterior_params))


@pytest.mark.slow  # compiles the tiny flowdiff step
def test_ema_draws_with_the_ema_flow_params_and_params_with_the_current(trained):
  state, batch = trained
  rng = jax.random.key(5)
  ema = step_lib.posterior_samples(_with(state, "ema"), batch, rng, 4)
  current = step_lib.posterior_samples(state, batch, rng, 4)
  # The same draws from a state whose current flow params are the EMA.
  swapped = state.replace(params={**state.params, "flow": state.ema_params["flow"]})
  np.testing.assert_array_equal(ema, step_lib.posterior_samples(swapped, batch, rng, 4))
  assert float(jnp.max(jnp.abs(ema - current))) > 1e-4


@pytest.mark.slow  # compiles the tiny flowdiff step
def test_eval_step_measures_the_chosen_flow_params(trained):
  state, batch = trained
  rng = jax.random.key(6)
  swapped = state.replace(params={**state.params, "flow": state.ema_params["flow"]})
  got = step_lib.eval_step(_with(state, "ema"), batch, rng)
  want = step_lib.eval_step(swapped, batch, rng)
  for key in ("eval/psnr_posterior_mean", "eval/residual_ratio", "eval/posterior_std"):
    np.testing.assert_array_equal(got[key], want[key])
  assert got["eval/posterior_std"] != step_lib.eval_step(state, batch, rng)["eval/posterior_std"]


@pytest.mark.slow  # compiles the tiny flowdiff step
def test_training_ignores_the_choice(trained):
  state, batch = trained
  train_batch = {"y": batch["y"], "omega": batch["omega"]}
  a, _ = step_lib.train_step(state, train_batch, jax.random.key(7))
  b, _ = step_lib.train_step(_with(state, "ema"), train_batch, jax.random.key(7))
  for u, v in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params), strict=True):
    np.testing.assert_array_equal(u, v)


def test_a_bad_choice_names_the_field():
  with pytest.raises(ConfigError, match="amortized.posterior_params.*allowed: params, ema"):
    validate_config(_config("latest"))


@pytest.mark.slow  # compiles the tiny flowdiff step
def test_eval_step_reports_the_priors_tweedie_mean_for_denoising(trained):
  """Beside the flow's mean, eval_step scores the EMA prior's own E[x | y] (denoising)."""
  state, batch = trained
  metrics = step_lib.eval_step(state, batch, jax.random.key(8))
  eps = lambda x_t, t: state.objective.score_net.apply(
      {"params": state.ema_params["score"]}, x_t, t, train=False)
  mean = sampling.tweedie_posterior_mean(eps, state.objective.schedule, batch["y"], 0.1)
  np.testing.assert_allclose(metrics["eval/psnr_prior_tweedie"],
                             jnp.mean(evaluation.psnr(mean, batch["x"])), rtol=1e-5)
