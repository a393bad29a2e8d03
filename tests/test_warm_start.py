"""The flow methods' Gaussian-EM warm start (config.flow.base = "gaussian_em").

Before training, N(μ, Σ) is fitted by EM to the training observations alone;
its posterior mean x̂₀(y) replaces A⁺y as the flow's conditioning image and
residual base, and is held fixed in params["gaussian_em"]. Checked here: the
fit sees observations only, a fresh flow's samples centre on x̂₀(y) (it starts
as the Gaussian restorer), the step never changes the fitted params, and a run
resumes with them read back from its checkpoint, not refitted.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flowdiff_jax import gaussian_em, operators, runs, step as step_lib, train
from flowdiff_jax.configs import tiny
from flowdiff_jax.methods import base
from flowdiff_jax.validate import ConfigError, validate_config

N = 64


def _config(operator: str, rank: int):
  config = tiny.get_config()
  config.method = "flowdiff"
  config.operator.name = operator
  config.operator.sigma_y = 0.05
  config.flow.base = "gaussian_em"
  config.gaussian_em.update(rank=rank, num_iters=4, batch_size=32)
  return config


def _images(n: int = N, seed: int = 0) -> np.ndarray:
  """Smooth random images in [-1, 1], [n, 28, 28, 1] (a few low frequencies each)."""
  rng = np.random.default_rng(seed)
  r, c = np.mgrid[0:28, 0:28] / 28.0
  coef = rng.normal(size=(n, 3, 3))
  img = sum(coef[:, i, j, None, None] * np.cos(np.pi * (i * r + j * c))
            for i in range(3) for j in range(3))
  return np.tanh(0.5 * img)[..., None].astype(np.float32)


def _observations(config, x):
  op = operators.make_operator(config.operator)
  measured = operators.corrupt(op, jnp.asarray(x), jnp.arange(len(x)), 0)
  y = measured.pop("y")
  calls = []

  def observations(max_examples):
    calls.append(max_examples)
    return y, measured
  return op, y, measured, observations, calls


@pytest.mark.parametrize("operator,rank", [pytest.param("denoise", 0, marks=pytest.mark.slow),
                                           ("inpaint_random", 4)])
def test_fresh_flow_starts_at_the_gaussian_restorer(operator, rank):
  config = _config(operator, rank)
  validate_config(config)
  op, y, omega, observations, calls = _observations(config, _images())
  fitted = base.fit_flow_base(config, observations)
  assert calls == [0] and set(fitted) == {"gaussian_em"}
  expected = gaussian_em.restorer(
      gaussian_em.fit(op, y, omega, num_iters=4, rank=rank or None, init_var=0.1,
                      batch_size=32, seed=config.seed), op)
  for k in expected:
    np.testing.assert_allclose(fitted["gaussian_em"][k], expected[k], rtol=1e-5, atol=1e-6)

  batch = {"y": y[:8], "omega": jax.tree.map(lambda a: a[:8], omega)}
  state = step_lib.create_train_state(config, jax.random.key(0), batch, fitted_params=fitted)
  assert set(state.params) == {"flow", "score", "gaussian_em"}
  x_hat = gaussian_em.restore(fitted["gaussian_em"], op, batch["y"], batch["omega"])
  samples = step_lib.posterior_samples(state, batch, jax.random.key(1), 16)
  mean = jnp.mean(samples, axis=0)
  # The fresh flow is x̂₀(y) plus a small spread (its ActNorm init aims at std 0.1).
  assert float(jnp.mean(jnp.abs(mean - x_hat))) < 0.05
  if operator == "inpaint_random":  # and x̂₀ is not A⁺y (which leaves the holes at 0)
    assert float(jnp.mean(jnp.abs(x_hat - op.pinv(batch["y"], batch["omega"])))) > 0.05

  # The step trains the flow and the score network, never the fitted Gaussian.
  # (Two steps: the tiny config's warm-up gives the first one a zero learning rate.)
  step = jax.jit(step_lib.train_step)
  new, _ = step(state, batch, jax.random.key(2))
  new, metrics = step(new, batch, jax.random.key(3))
  assert np.isfinite(float(metrics["train/loss"]))
  for k in fitted["gaussian_em"]:
    np.testing.assert_array_equal(new.params["gaussian_em"][k], state.params["gaussian_em"][k])
  assert any(not np.array_equal(a, b) for a, b in zip(
      jax.tree.leaves(new.params["flow"]), jax.tree.leaves(state.params["flow"])))


def test_fitted_shapes_match_the_fit():
  for operator, rank in (("denoise", 0), ("blur", 0), ("inpaint_random", 4)):
    config = _config(operator, rank)
    *_, observations, _ = _observations(config, _images(16))
    fitted = base.fit_flow_base(config, observations)["gaussian_em"]
    shapes = base.flow_base_shapes(config, (28, 28, 1))["gaussian_em"]
    assert {k: v.shape for k, v in fitted.items()} == {k: s.shape for k, s in shapes.items()}
  config = _config("denoise", 0)
  config.flow.base = "pinv"
  assert base.flow_base_shapes(config, (28, 28, 1)) is None
  assert base.fit_flow_base(config, lambda n: pytest.fail("must not read data")) is None


@pytest.mark.parametrize("field,value,message", [
    ("flow.base", "wiener", "allowed: pinv, gaussian_em"),
    ("gaussian_em.rank", -1, "must be an integer >= 0"),
    ("gaussian_em.num_iters", 0, "config.gaussian_em.num_iters=0"),
])
def test_bad_warm_start_settings_name_the_field(field, value, message):
  config = _config("denoise", 0)
  section, name = field.split(".")
  config[section][name] = value
  with pytest.raises(ConfigError, match=message):
    validate_config(config)


def test_dense_fit_of_per_example_masks_is_refused_before_training():
  with pytest.raises(ConfigError, match="config.gaussian_em.rank=0: .*needs a low-rank fit"):
    validate_config(_config("inpaint_random", 0))


@pytest.mark.slow
def test_warm_started_run_resumes_without_refitting(tmp_path, fmnist_idx_dir, monkeypatch):
  config = _config("inpaint_random", 4)
  config.data.fmnist_idx_dir = fmnist_idx_dir
  config.data.max_train_examples = 32
  config.data.read_threads = 1
  config.training.update(num_train_steps=2, eval_every_steps=0, sample_every_steps=0)
  workdir = str(tmp_path / "run")
  state = train.train_and_evaluate(config, workdir)
  fitted = jax.device_get(state.params["gaussian_em"])
  # The fit saw the 32 corrupted training images only.
  assert fitted["mu"].shape == (784,) and np.isfinite(fitted["factor"]).all()

  def no_refit(*args, **kwargs):
    raise AssertionError("a resumed run must read the fit from its checkpoint")
  monkeypatch.setattr(train, "fit_before_training", no_refit)
  config.training.num_train_steps = 3
  resumed = train.train_and_evaluate(config, workdir)
  assert int(resumed.step) == 3
  for k, v in fitted.items():
    np.testing.assert_array_equal(jax.device_get(resumed.params["gaussian_em"][k]), v)
  _, loaded = runs.load_run(workdir)
  for k, v in fitted.items():
    np.testing.assert_array_equal(np.asarray(loaded.params["gaussian_em"][k]), v)
