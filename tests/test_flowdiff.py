"""FlowDiff's joint train step (docs/design.md §2.4).

Gradient routing checked by finite differences, the jit / sharded-jit /
shard_map / pmap forms computing the same update, the β schedules and the
score network's update period, and the Gaussian oracle: from corrupted
samples of N(μ, Σ), the FlowDiff prior's covariance is closer to Σ than the
naive model's.
"""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flowdiff_jax import oracle, parallel, step as step_lib
from flowdiff_jax.configs import default
import params_testing

_TESTS = os.path.dirname(os.path.abspath(__file__))

# 8x8 images and the Gaussian ε-network (shared with tests/manual_forms.py).
_config = params_testing.step_config
_batch = params_testing.step_batch
_state = params_testing.step_state


def _key(seed):
  # "rbg" keys compile faster on CPU; tests comparing shardings keep threefry,
  # whose draws are the same however the output is sharded.
  return jax.random.key(seed, impl="rbg")


def _assert_trees_close(a, b, rtol=2e-4, atol=2e-6):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


_FORM_METHODS = ("naive", "flowdiff")


@pytest.fixture(scope="module")
def manual_forms(tmp_path_factory):
  """Runs tests/manual_forms.py once for both methods (2 devices); its output folder.

  A subprocess, with a timeout, so that a hang in a collective fails this
  test instead of blocking the suite (the batched LAPACK deadlock fixed in
  models/gaussian.py first showed up here).
  """
  out = tmp_path_factory.mktemp("forms")
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  subprocess.run([sys.executable, os.path.join(_TESTS, "manual_forms.py"), str(out),
                  *_FORM_METHODS], cwd=_TESTS, env=env, check=True, timeout=600)
  return out


@pytest.mark.parametrize("method", _FORM_METHODS)
@pytest.mark.slow
def test_jit_sharded_shard_map_and_pmap_forms_agree(method, manual_forms):
  """Same global batch and key: one device, 4-device jit, shard_map and pmap give one update."""
  config, batch = _config(method), _batch()
  state0 = _state(config, batch)
  rng = jax.random.key(2)
  fresh = lambda: jax.tree.map(np.copy, state0)
  ref_state, ref_metrics = jax.device_get(jax.jit(step_lib.train_step)(fresh(), batch, rng))
  assert int(ref_state.step) == 1
  ref_leaves = jax.tree.leaves((ref_state.params, ref_state.opt_state))

  def check(name, metrics, leaves):
    assert set(metrics) == set(ref_metrics), name
    for key in ref_metrics:
      np.testing.assert_allclose(metrics[key], ref_metrics[key], rtol=2e-5, atol=1e-6,
                                 err_msg=f"{name}: {key}")
    assert len(leaves) == len(ref_leaves), name
    for a, b in zip(leaves, ref_leaves):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=2e-6,
                                 err_msg=name)

  mesh = parallel.make_mesh(jax.devices()[:4])
  state, metrics = jax.device_get(step_lib.make_train_step(config, mesh)(
      jax.device_put(fresh(), parallel.replicated(mesh)),
      jax.device_put(batch, parallel.batch_sharding(mesh)), rng))
  check("jit on 4 devices", metrics, jax.tree.leaves((state.params, state.opt_state)))

  forms = np.load(manual_forms / f"{method}.npz")
  for form in ("shard_map", "pmap"):
    metrics = {k.split("|")[2]: forms[k] for k in forms if k.startswith(f"{form}|metric|")}
    leaves = [forms[f"{form}|state|{i}"] for i in range(len(ref_leaves))]
    check(form, metrics, leaves)


def _directional_derivatives(loss_fn, params, network, seed, h=1e-2):
  """(autodiff ⟨∇total, v⟩, central differences of each term along v), v a unit on one network."""
  leaves, treedef = jax.tree.flatten(params[network])
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  v = [jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)]
  norm = jnp.sqrt(sum(jnp.sum(a * a) for a in v))
  v = jax.tree.unflatten(treedef, [a / norm for a in v])
  grads = jax.grad(lambda p: loss_fn(p)[0])(params)[network]
  autodiff = sum(jnp.vdot(g, d) for g, d in zip(jax.tree.leaves(grads), jax.tree.leaves(v)))

  def terms_at(sign):
    moved = dict(params)
    moved[network] = jax.tree.map(lambda p, d: p + sign * h * d, params[network], v)
    return loss_fn(moved)[1]
  plus, minus = terms_at(1.0), terms_at(-1.0)
  return float(autodiff), {k: float((plus[k] - minus[k]) / (2 * h)) for k in plus}


@pytest.mark.parametrize("shared_score_pass", [False, True])
def test_gradient_routing_by_finite_differences(shared_score_pass):
  """The score loss sends no gradient to the flow; the prior term none to the score network.

  Along a random direction of one network's params, the autodiff derivative
  of the total loss must equal the finite-difference derivative of that
  network's own objective, while the other objective visibly changes too
  (so a leak would be seen). With the shared score pass both objectives come
  from one network pass whose gradient is split by a custom VJP.
  """
  config, batch = _config(), _batch()
  config.amortized.update(num_time_samples=1, beta_prior_warmup_steps=0)  # β_prior = 1 now
  config.flowdiff.shared_score_pass = shared_score_pass
  state = _state(config, batch)
  loss_fn = jax.jit(step_lib.make_loss_fn(state.objective, batch, state.step, _key(3)))
  params = jax.tree.map(jnp.asarray, state.params)

  for network, own, other in (("flow", "flow_loss", "dsm_loss"),
                              ("score", "dsm_loss", "flow_loss")):
    auto, fd = _directional_derivatives(loss_fn, params, network, seed=4)
    own_error = abs(auto - fd[own])
    leak_error = abs(auto - (fd[own] + fd[other]))  # what a gradient of the plain sum gives
    assert own_error < 0.01 * abs(fd[own]) + 1e-5, (network, auto, fd)
    assert own_error < leak_error / 10, (network, auto, fd)


def test_shared_score_pass_on_one_and_four_devices_agree():
  """The shared pass's custom VJP under the sharded jit: one update on 1 and 4 devices."""
  config, batch = _config(), _batch()
  config.flowdiff.shared_score_pass = True
  state0 = _state(config, batch)
  rng = jax.random.key(2)
  fresh = lambda: jax.tree.map(np.copy, state0)
  ref_state, ref_metrics = jax.device_get(jax.jit(step_lib.train_step)(fresh(), batch, rng))
  mesh = parallel.make_mesh(jax.devices()[:4])
  state, metrics = jax.device_get(step_lib.make_train_step(config, mesh)(
      jax.device_put(fresh(), parallel.replicated(mesh)),
      jax.device_put(batch, parallel.batch_sharding(mesh)), rng))
  assert float(ref_metrics["train/dsm_loss"]) > 0
  for key in ref_metrics:
    np.testing.assert_allclose(metrics[key], ref_metrics[key], rtol=2e-5, atol=1e-6,
                               err_msg=key)
  _assert_trees_close((state.params, state.opt_state), (ref_state.params, ref_state.opt_state))


def test_flowdiff_metrics_and_beta_schedules():
  """Every term is a metric; the loss is their weighted sum; β_prior warms up, β_ent anneals."""
  config, batch = _config(), _batch()
  config.amortized.update(beta_prior=2.0, beta_prior_warmup_steps=4, beta_ent=1.0,
                          beta_ent_init=3.0, beta_ent_anneal_steps=2)
  state = _state(config, batch)
  step = jax.jit(step_lib.train_step)
  expected = {"data_fidelity", "prior_nll", "log_q", "flow_loss", "dsm_loss", "loss",
              "beta_data", "beta_prior", "beta_ent", "grad_norm_flow", "grad_norm_score",
              "prior_nll_bpd", "posterior_entropy_bpd", "update_skipped"}
  seen = []
  for _ in range(5):
    state, metrics = step(state, batch, _key(2))
    m = jax.device_get(metrics)
    assert set(m) == {f"train/{k}" for k in expected}
    assert all(np.isfinite(v) for v in m.values()), m
    np.testing.assert_allclose(m["train/loss"], m["train/flow_loss"] + m["train/dsm_loss"],
                               rtol=1e-6)
    np.testing.assert_allclose(
        m["train/flow_loss"],
        m["train/beta_data"] * m["train/data_fidelity"]
        + m["train/beta_prior"] * m["train/prior_nll"] + m["train/beta_ent"] * m["train/log_q"],
        rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(m["train/prior_nll_bpd"], m["train/prior_nll"] / np.log(2) + 7,
                               rtol=1e-6)
    seen.append((m["train/beta_prior"], m["train/beta_ent"]))
  np.testing.assert_allclose(seen, [(0.0, 3.0), (0.5, 2.0), (1.0, 1.0), (1.5, 1.0), (2.0, 1.0)])


def test_score_network_updates_every_k_steps():
  config, batch = _config(), _batch()
  config.flowdiff.flow_updates_per_score_update = 3
  config.optim.warmup_steps = config.flow_optim.warmup_steps = 0  # no zero-lr first step
  state = _state(config, batch)
  step = jax.jit(step_lib.train_step)
  changed = []
  for _ in range(6):
    new, _ = step(jax.tree.map(jnp.copy, state), batch, _key(2))
    moved = lambda net: any(not np.array_equal(a, b) for a, b in zip(
        jax.tree.leaves(jax.device_get(new.params[net])),
        jax.tree.leaves(jax.device_get(state.params[net]))))
    changed.append((moved("flow"), moved("score")))
    state = new
  assert changed == [(True, False), (True, False), (True, True)] * 2


@pytest.mark.parametrize("every_k", [1, 2])
def test_learning_rate_warm_up_then_cosine_decay_counted_in_updates(every_k):
  """optim.decay_steps: with a constant gradient Adam's update is −lr exactly, so the
  updates trace the schedule: linear warm-up, cosine to 0 at update decay_steps, then 0."""
  from flowdiff_jax.methods import base

  optim = default.get_config().optim
  optim.update(learning_rate=0.1, warmup_steps=4, decay_steps=12, grad_clip_norm=0.0,
               eps=1e-12)
  tx = base.make_optimizer(optim, every_k_steps=every_k)
  params = {"w": jnp.zeros(())}
  opt_state, grads = tx.init(params), {"w": jnp.ones(())}
  got = []
  for _ in range(16 * every_k):
    updates, opt_state = tx.update(grads, opt_state, params)
    got.append(-float(updates["w"]))
  applied = np.asarray(got[every_k - 1::every_k])  # MultiSteps: zero updates in between
  k = np.arange(16)
  want = np.where(k < 4, 0.1 * k / 4,
                  np.where(k < 12, 0.05 * (1 + np.cos(np.pi * (k - 4) / 8)), 0.0))
  np.testing.assert_allclose(applied, want, atol=1e-6)
  assert not any(got[i] for i in range(len(got)) if (i + 1) % every_k)


# --------------------------------------------------------------------------
# The Gaussian oracle (docs/design.md §2.8): does FlowDiff recover Σ, not Σ + noise?
# --------------------------------------------------------------------------

_H = 4


def oracle_config(method: str, operator: str, steps: int):
  """The settings of experiments/gaussian/run.py (its flow, optimisers, β_prior warm-up)."""
  config = default.get_config()
  config.method = method
  config.seed = 0
  config.model.name = "gaussian"
  config.operator.update(name=operator, sigma_y=0.2, drop_prob=0.5)
  config.flow.update(num_levels=1, num_steps=4, hidden_channels=32, cond_channels=16)
  config.flow_optim.update(learning_rate=2e-3, warmup_steps=100, grad_clip_norm=0.0)
  config.optim.update(learning_rate=3e-3, warmup_steps=100, grad_clip_norm=0.0,
                      ema_decay=0.99)
  config.amortized.update(num_time_samples=4, beta_prior_warmup_steps=steps // 4)
  config.training.update(batch_size=64, num_train_steps=steps)
  return config


def train_on(config, data, *, seed: int = 0):
  """Trains with the public API in a plain loop; returns the final state."""
  n = data["y"].shape[0]
  order = np.random.default_rng(seed)
  take = lambda idx: jax.tree.map(lambda a: a[idx], data)
  state = step_lib.create_train_state(config, _key(config.seed), take(np.arange(256)))
  step_fn = jax.jit(step_lib.train_step, donate_argnums=0)
  rng = _key(config.seed + 1)
  for _ in range(config.training.num_train_steps):
    state, _ = step_fn(state, take(order.integers(0, n, config.training.batch_size)), rng)
  return state


@pytest.mark.slow
def test_gaussian_oracle_flowdiff_beats_naive():
  """From corrupted samples of N(μ, Σ), FlowDiff's prior is closer to Σ than naive's.

  4×4 images, denoising with σ_y = 0.2, 4096 examples with one fixed
  corruption each; both methods use the exact Gaussian ε-network family
  (model.name="gaussian"), so the comparison measures the training method,
  not network capacity; same data, steps (4000) and optimiser. The error is
  ‖Ĉ − Σ‖_F/‖Σ‖_F of 4000 samples of the EMA prior (Heun, 100 steps): naive
  converges to ≈ 0.25 (it learns Σ + σ_y² I); FlowDiff, an EM-like
  alternation, is slower: ≈ 0.26 at step 2000, 0.19 at 3500 in
  experiments/gaussian (the longer version, with the masked case).
  """
  mu, sigma = oracle.gaussian_problem(_H)
  errors = {}
  for method in ("naive", "flowdiff"):
    config = oracle_config(method, "denoise", steps=4000)
    _, data = oracle.corrupted_data(config, mu, sigma, 4096)
    state = train_on(config, data)
    errors[method] = oracle.relative_error(oracle.prior_covariance(state, (_H, _H, 1)), sigma)
  print(f"relative covariance error {errors}")
  assert errors["flowdiff"] < 0.85 * errors["naive"], errors
