"""The speed options (issue 7): bfloat16 compute, rematerialisation, several steps per dispatch.

Each option must keep what the others rely on: with bfloat16 the flow is
still exactly invertible with a log-determinant equal to its Jacobian's, the
parameters stay float32 and the joint loss moves only by bf16 rounding;
remat gives the same loss and gradients; K steps in one `lax.scan` give the
state of K single steps, and a run may switch K when it resumes.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flowdiff_jax import parallel, step as step_lib, train
from flowdiff_jax.configs import tiny
from flowdiff_jax.models import flow as flow_lib
from flowdiff_jax.validate import ConfigError, validate_config
import params_testing

_SIZE = 8


def _config(method="flowdiff", model="unet", **training):
  """8x8 images; a one-downsampling U-Net with attention at 4x4 (or the Gaussian ε-net)."""
  config = tiny.get_config()
  config.method = method
  config.data.image_size = _SIZE
  config.model.name = model
  config.model.attn_resolutions = (4,)
  config.training.update(training)
  return config


def _batch(seed=1):
  return params_testing.observation_batch(seed, size=_SIZE)


def _perturbed_state(config, batch):
  """A fresh state with every parameter moved off its init (zero heads would hide dtypes)."""
  with jax.threefry_partitionable(False):
    init = functools.partial(step_lib.create_train_state, config)
    state = jax.jit(init)(jax.random.key(0), batch)
  return state.replace(params=params_testing.perturb(state.params, 7, 0.05))


def _objective(config):
  return step_lib.make_objective(config, channels=1)


def _loss_and_grads(obj, params, batch, rng):
  """Jitted (loss, terms), grads of `obj`'s loss, and the compiled program's memory analysis."""
  def f(params):
    loss_fn = step_lib.make_loss_fn(obj, batch, jnp.int32(3), rng)
    return jax.value_and_grad(loss_fn, has_aux=True)(params)
  compiled = jax.jit(f).lower(params).compile()
  return compiled(params), compiled.memory_analysis()


def _leaves(tree):
  return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(tree))]


def _assert_states_close(a, b, rtol=1e-6):
  """Params, EMA and optimiser state equal up to float rounding.

  Within rtol, or rtol times the largest entry of their kind (params, EMA,
  Adam's mu, Adam's nu): gradients that are zero but for rounding (~1e-11,
  e.g. of a bias before a GroupNorm) leave rounding-level entries that no
  relative tolerance of their own would match.
  """
  def groups(state):
    out = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(
        jax.device_get({"params": state.params, "ema": state.ema_params,
                        "opt": state.opt_state})):
      name = jax.tree_util.keystr(path)
      kind = next((k for k in (".mu", ".nu") if k in name), name.split("]")[0])
      out.setdefault(kind, []).append((name, np.asarray(leaf)))
    return out
  groups_a, groups_b = groups(a), groups(b)
  assert groups_a.keys() == groups_b.keys()
  for kind, leaves_b in groups_b.items():
    scale = max(np.max(np.abs(y), initial=0.0) for _, y in leaves_b)
    for (name, x), (_, y) in zip(groups_a[kind], leaves_b, strict=True):
      np.testing.assert_allclose(x, y, rtol=rtol, atol=rtol * scale, err_msg=name)


# ---------------------------------------------------------------------------
# bfloat16 compute.


@pytest.mark.slow
def test_bf16_flow_is_exactly_invertible_and_its_logdet_matches_the_jacobian():
  kwargs = dict(num_levels=2, num_steps=2, hidden_channels=8, cond_channels=4)
  flow32 = flow_lib.ConditionalGlow(**kwargs)
  flow16 = flow_lib.ConditionalGlow(**kwargs, dtype=jnp.bfloat16)
  x = params_testing.normal(21, (16, _SIZE, _SIZE, 1), scale=0.7)
  cond = params_testing.normal(22, x.shape[:3] + (2,))
  variables = params_testing.perturb(params_testing.jit_init(flow16, x, cond), 23, 0.1)
  assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(variables))
  assert jax.tree.structure(variables) == jax.tree.structure(
      jax.eval_shape(flow32.init, jax.random.key(0), x, cond))
  x, cond = x[:2], cond[:2]
  fwd = jax.jit(lambda v, c: flow16.apply(variables, v, c, method=flow16.forward))
  inv = jax.jit(lambda v, c: flow16.apply(variables, v, c, method=flow16.inverse))

  z, ld_fwd = fwd(x, cond)
  assert z.dtype == ld_fwd.dtype == jnp.float32
  # The coupling nets did compute in bf16: the float32 flow gives another z.
  z32, _ = flow32.apply(variables, x, cond, method=flow32.forward)
  assert float(jnp.max(jnp.abs(z - z32))) > 1e-4
  x_back, ld_inv = inv(z, cond)
  np.testing.assert_allclose(x_back, x, atol=5e-5, rtol=1e-5)
  np.testing.assert_allclose(ld_inv, -ld_fwd, rtol=1e-5, atol=1e-3)

  x1, c1, z1 = x[:1], cond[:1], z[:1]
  assert abs(float(ld_fwd[0])) > 1.0, "logdet check would be vacuous"
  np.testing.assert_allclose(
      ld_fwd[0], params_testing.jacobian_logdet(lambda v: fwd(v, c1)[0], x1), rtol=1e-4, atol=5e-3)
  np.testing.assert_allclose(
      ld_inv[0], params_testing.jacobian_logdet(lambda v: inv(v, c1)[0], z1), rtol=1e-4, atol=5e-3)


# Relative change of the joint loss (and of each term) from bf16 compute, same
# params and batch: the networks' outputs carry bf16 rounding (8 mantissa bits,
# ~4e-3 relative per operation), the terms are float32 sums over them. Seen:
# up to 1.3e-3 (the score network's gradient norm).
_BF16_RTOL = 1e-2


@pytest.mark.slow
def test_bf16_flowdiff_step_is_close_to_float32_and_params_stay_float32():
  """One joint step from the same params, batch and key, in float32 and in bf16."""
  config32, config16 = _config(), _config()
  config16.model.compute_dtype = "bfloat16"
  validate_config(config16)
  batch = _batch()
  state = _perturbed_state(config32, batch)
  rng = jax.random.key(3)
  step = jax.jit(step_lib.train_step)
  new32, metrics32 = jax.device_get(step(state, batch, rng))
  # Same params and optimiser: only the static networks differ.
  new16, metrics16 = jax.device_get(step(state.replace(objective=_objective(config16)), batch,
                                         rng))
  print({k: (float(metrics32[k]), float(metrics16[k])) for k in metrics32})
  assert metrics16["train/loss"] != metrics32["train/loss"], "bf16 compute had no effect"
  assert metrics16["train/update_skipped"] == 0.0
  for key in ("loss", "dsm_loss", "prior_nll", "log_q", "data_fidelity", "flow_loss",
              "grad_norm_flow", "grad_norm_score"):
    np.testing.assert_allclose(metrics16[f"train/{key}"], metrics32[f"train/{key}"],
                               rtol=_BF16_RTOL, err_msg=key)
  # Every parameter, Adam moment and EMA stays float32.
  for tree in (new16.params, new16.ema_params, new16.opt_state):
    for leaf in jax.tree.leaves(tree):
      if jnp.issubdtype(leaf.dtype, jnp.floating):
        assert leaf.dtype == jnp.float32


# ---------------------------------------------------------------------------
# Rematerialisation.


@pytest.mark.slow
def test_remat_gives_the_same_loss_and_gradients():
  config, config_remat = _config(), _config(remat=True)
  validate_config(config_remat)
  batch = _batch()
  state = _perturbed_state(config, batch)
  rng = jax.random.key(4)
  ((loss, terms), grads), memory = _loss_and_grads(_objective(config), state.params, batch, rng)
  ((loss_r, terms_r), grads_r), memory_r = _loss_and_grads(
      _objective(config_remat), state.params, batch, rng)
  # XLA's temporaries with and without remat: reported, not asserted (on CPU
  # XLA may schedule either way; the saving shows at real sizes, see bench.py).
  print(f"temp bytes: {memory.temp_size_in_bytes} without remat, "
        f"{memory_r.temp_size_in_bytes} with")
  for key in terms:
    np.testing.assert_allclose(terms_r[key], terms[key], rtol=1e-5, atol=1e-7, err_msg=key)
  assert jax.tree.structure(grads_r) == jax.tree.structure(grads)
  for net in grads:
    # Some entries are zero up to rounding (~1e-11, e.g. biases before a
    # GroupNorm): compared on the scale of the network's largest gradient.
    scale = max(np.max(np.abs(g)) for g in _leaves(grads[net]))
    for a, b in zip(_leaves(grads_r[net]), _leaves(grads[net])):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * scale, err_msg=net)


# ---------------------------------------------------------------------------
# Several steps per dispatch.


@pytest.mark.slow
def test_k_steps_in_one_dispatch_equal_k_single_steps():
  """3 steps (the first with learning rate 0, then warm-up) as one scan vs 3 calls, 4 devices."""
  config = _config(model="gaussian")
  batches = [_batch(seed) for seed in (1, 2, 3)]
  mesh = parallel.make_mesh(jax.devices()[:4])
  state0 = jax.device_get(_perturbed_state(config, batches[0]))
  fresh = lambda: jax.device_put(jax.tree.map(np.copy, state0), parallel.replicated(mesh))
  rng = jax.random.key(5)

  step_fn = step_lib.make_train_step(config, mesh)
  state, single = fresh(), []
  for batch in batches:
    state, metrics = step_fn(state, jax.device_put(batch, parallel.batch_sharding(mesh)), rng)
    single.append(jax.device_get(metrics))
  sharding = parallel.batch_sharding(mesh)
  stacked = train._make_stack(mesh)([jax.device_put(b, sharding) for b in batches])
  assert stacked["y"].shape == (3, 8, _SIZE, _SIZE, 1)
  scanned, metrics = step_lib.make_train_steps(config, mesh)(fresh(), stacked, rng)

  assert int(scanned.step) == int(state.step) == 3
  assert set(metrics) == set(single[0])
  # Not asserted bit for bit: XLA compiles the K steps as one program and may
  # fuse, and round float32 reductions, differently (seen with a rolled scan:
  # 1 ulp in a loss term at step 3 on 4 CPU devices). The same draws and
  # updates otherwise.
  for key, values in jax.device_get(metrics).items():
    assert values.shape == (3,), key
    np.testing.assert_allclose(values, [m[key] for m in single], rtol=1e-6, err_msg=key)
  _assert_states_close(scanned, state)
  # The loop's per-step metrics history takes single-step and K-step entries.
  fetched = train._fetch_metrics([jax.tree.map(lambda v: v[0], metrics),
                                  jax.tree.map(lambda v: v[1:], metrics)])
  np.testing.assert_array_equal([m["train/loss"] for m in fetched], metrics["train/loss"])


@pytest.mark.parametrize("field", ["num_train_steps", "log_every_steps", "eval_every_steps",
                                   "sample_every_steps", "checkpoint_every_steps"])
def test_intervals_must_be_multiples_of_steps_per_dispatch(field):
  config = tiny.get_config()
  config.training.update(steps_per_dispatch=2, num_train_steps=4, log_every_steps=2,
                         eval_every_steps=2, sample_every_steps=4, checkpoint_every_steps=2)
  validate_config(config)
  config.training[field] = 3
  with pytest.raises(ConfigError, match=rf"config.training.{field}=3: must be a multiple of "
                                        r"training.steps_per_dispatch=2"):
    validate_config(config)


@pytest.mark.slow
def test_run_resumed_under_other_steps_per_dispatch_ends_at_the_same_params(
    tmp_path, mock_fashion_mnist):
  """K=1 for 4 steps, vs K=1 for 1 step then K=2 to step 4 (a single step to 2, then one dispatch).

  Changing K changes float rounding (see above), so the resume needs
  allow_config_change; the same K resumes without it.
  """
  def config(steps, per_dispatch):
    config = tiny.get_config()
    config.method = "naive"
    config.data.fmnist_idx_dir = ""  # the mocked tfds source
    config.training.update(num_train_steps=steps, steps_per_dispatch=per_dispatch,
                           eval_every_steps=0, sample_every_steps=0)
    return config

  reference = train.train_and_evaluate(config(4, 1), str(tmp_path / "k1"))
  train.train_and_evaluate(config(1, 1), str(tmp_path / "k2"))
  resumed = train.train_and_evaluate(config(4, 2), str(tmp_path / "k2"),
                                     allow_config_change=True)
  assert int(resumed.step) == 4
  _assert_states_close(resumed, reference)


# ---------------------------------------------------------------------------
# The loop around the step.


@pytest.mark.parametrize("per_dispatch", [1, 2])
@pytest.mark.slow
def test_loop_compiles_its_step_once_and_feeds_it_device_arrays_only(
    tmp_path, mock_fashion_mnist, monkeypatch, per_dispatch):
  """6 steps with logging, an eval and two checkpoints in between: the jitted step
  compiles once (no retrace from a changed shape, dtype, sharding or weak type
  after a save or an eval) and every call gets arrays already on the device
  (an implicit host transfer inside the call raises under the transfer guard)."""
  called = {}  # jitted step -> its cache size after its first call

  def spy(make):
    def wrapped(config, mesh):
      fn = make(config, mesh)

      def guarded(*args):
        with jax.transfer_guard("disallow"):
          out = fn(*args)
        # The compilation cache's size once the first call has compiled.
        called.setdefault(fn, fn._cache_size())
        return out
      return guarded
    return wrapped

  monkeypatch.setattr(step_lib, "make_train_step", spy(step_lib.make_train_step))
  monkeypatch.setattr(step_lib, "make_train_steps", spy(step_lib.make_train_steps))
  config = tiny.get_config()
  config.method = "naive"
  config.data.fmnist_idx_dir = ""  # the mocked tfds source
  config.training.update(num_train_steps=6, steps_per_dispatch=per_dispatch, log_every_steps=2,
                         eval_every_steps=2, sample_every_steps=0, checkpoint_every_steps=2)
  state = train.train_and_evaluate(config, str(tmp_path))

  assert int(state.step) == 6
  # One jitted form is called (the K-step one when K > 1), and nothing compiled
  # after its first call. (Compared with the size after the first call, not
  # with 1: jit objects of the same function and options share one cache, which
  # earlier tests may have filled.)
  assert len(called) == 1
  assert [fn._cache_size() for fn in called] == list(called.values())
