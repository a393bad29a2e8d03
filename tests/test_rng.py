"""Per-example draws do not depend on how the batch is split (docs/design.md §5.3).

The same function of a global batch is run three ways: under jax.jit on the
whole batch (axis_name=None), under jax.shard_map over 4 devices and under
jax.pmap with the batch reshaped to [4, B/4, ...] (axis_name="data"); the
shard_map and pmap results, put back together, must equal the jit result.
"""

import functools

import jax
import jax.numpy as jnp
from jax.sharding import AxisType, PartitionSpec as P
import numpy as np
import pytest

from flowdiff_jax import diffusion, rng
from flowdiff_jax.models import flow as flow_lib
import params_testing

jax.config.update("jax_threefry_partitionable", True)

_DEVICES = 4
_AXIS = "data"


def _data(seed, shape):
  # Inputs from "rbg" keys: threefry draws (and inits) compile slowly on CPU
  # with jax_threefry_partitionable; the keys under test stay threefry.
  return jax.random.normal(jax.random.key(seed, impl="rbg"), shape)


@functools.cache
def _mesh():
  return jax.make_mesh((_DEVICES,), (_AXIS,), axis_types=(AxisType.Auto,))


def _three_ways(fn, args, in_specs, out_spec, batch_axes):
  """fn(*args, axis_name) three ways: (jit global, shard_map, pmap), each a global array.

  in_specs: a PartitionSpec per argument (P() = replicated); batch_axes: the
  sharded axis of each argument (None = replicated) and, last, of the output.
  """
  *arg_axes, out_axis = batch_axes
  global_ = jax.jit(functools.partial(fn, axis_name=None))(*args)
  sharded = jax.jit(jax.shard_map(functools.partial(fn, axis_name=_AXIS), mesh=_mesh(),
                                  in_specs=in_specs, out_specs=out_spec))(*args)

  def split(a, axis):  # [.., B, ..] -> [devices, .., B/devices, ..]
    a = a.reshape(a.shape[:axis] + (_DEVICES, -1) + a.shape[axis + 1:])
    return jnp.moveaxis(a, axis, 0)

  def merge(a, axis):  # inverse of split
    a = jnp.moveaxis(a, 0, axis)
    return a.reshape(a.shape[:axis] + (-1,) + a.shape[axis + 2:])

  mapped = [a if axis is None else split(a, axis) for a, axis in zip(args, arg_axes)]
  pmapped = jax.pmap(functools.partial(fn, axis_name=_AXIS), axis_name=_AXIS,
                     in_axes=tuple(None if axis is None else 0 for axis in arg_axes))(*mapped)
  return global_, sharded, merge(pmapped, out_axis)


@pytest.mark.parametrize("batch_axis", [0, 1])
def test_raw_draws_are_exactly_the_global_draw(batch_axis):
  key = jax.random.key(0)
  shape = (8, 3, 2) if batch_axis == 0 else (3, 8, 2)  # global shape; 8 rows split 4 ways
  dummy = jnp.zeros(shape)  # carries the local batch size into each function

  def draws(dummy, key, axis_name):
    local = dummy.shape
    n = rng.normal(key, local, batch_axis=batch_axis, axis_name=axis_name)
    u = rng.uniform(jax.random.fold_in(key, 1), local, -2.0, 3.0, batch_axis=batch_axis,
                    axis_name=axis_name)
    return jnp.stack([n, u])

  spec = P(_AXIS) if batch_axis == 0 else P(None, _AXIS)
  out_spec = P(None, _AXIS) if batch_axis == 0 else P(None, None, _AXIS)
  global_, sharded, pmapped = _three_ways(draws, (dummy, key), (spec, P()), out_spec,
                                          (batch_axis, None, batch_axis + 1))
  # With axis_name=None these are exactly jax.random's draws.
  np.testing.assert_array_equal(global_[0], jax.random.normal(key, shape))
  np.testing.assert_array_equal(
      global_[1], jax.random.uniform(jax.random.fold_in(key, 1), shape, jnp.float32, -2.0, 3.0))
  np.testing.assert_array_equal(sharded, global_)
  np.testing.assert_array_equal(pmapped, global_)
  # Each device really holds different rows.
  rows = np.moveaxis(np.asarray(global_[0]), batch_axis, 0).reshape(_DEVICES, -1)
  assert len({r.tobytes() for r in rows}) == _DEVICES


@pytest.mark.slow
def test_dsm_loss_is_independent_of_the_split():
  sched = diffusion.VPSchedule()
  x = _data(1, (8, 4, 4, 1))
  eps_fn = lambda x_t, t: 0.5 * x_t

  def loss(x, key, axis_name):
    return diffusion.dsm_loss(eps_fn, sched, x, key, axis_name=axis_name)

  global_, sharded, pmapped = _three_ways(loss, (x, jax.random.key(2)), (P(_AXIS), P()),
                                          P(_AXIS), (0, None, 0))
  assert global_.shape == (8,) and len(np.unique(np.asarray(global_))) == 8
  np.testing.assert_allclose(sharded, global_, rtol=1e-6)
  np.testing.assert_allclose(pmapped, global_, rtol=1e-6)


@pytest.mark.slow
def test_nll_bound_is_independent_of_the_split():
  sched = diffusion.VPSchedule()
  x = _data(3, (8, 2, 2, 1))
  eps_fn = lambda x_t, t: 0.5 * x_t

  def bound(x, key, axis_name):
    return diffusion.nll_bound(eps_fn, sched, x, key, num_time_samples=2,
                               time_sampling="uniform", axis_name=axis_name)

  global_, sharded, pmapped = _three_ways(bound, (x, jax.random.key(4)), (P(_AXIS), P()),
                                          P(_AXIS), (0, None, 0))
  np.testing.assert_allclose(sharded, global_, rtol=1e-6)
  np.testing.assert_allclose(pmapped, global_, rtol=1e-6)


@pytest.mark.slow
def test_flow_sample_is_independent_of_the_split():
  flow = flow_lib.ConditionalGlow(num_levels=1, num_steps=1, hidden_channels=4, cond_channels=4)
  cond = _data(5, (8, 4, 4, 2))
  with jax.threefry_partitionable(False):
    variables = jax.jit(flow.init)(jax.random.key(6, impl="rbg"), _data(7, (8, 4, 4, 1)), cond)
  variables = params_testing.perturb(variables, 3, 0.1)  # not the identity map

  def draw(cond, key, axis_name):
    x, log_q = flow_lib.sample(flow, variables, key, cond, 3, axis_name=axis_name)
    return jnp.concatenate([x.reshape(x.shape[:2] + (-1,)), log_q[..., None]], axis=-1)

  global_, sharded, pmapped = _three_ways(draw, (cond, jax.random.key(8)), (P(_AXIS), P()),
                                          P(None, _AXIS), (0, None, 1))
  assert global_.shape == (3, 8, 16 + 1)
  np.testing.assert_allclose(sharded, global_, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(pmapped, global_, rtol=1e-5, atol=1e-5)
