"""Runs one train step in its shard_map and pmap forms; a subprocess of test_flowdiff.py.

  python tests/manual_forms.py OUT_DIR METHOD [METHOD ...]

writes OUT_DIR/<method>.npz: for each form, the metrics and the flattened
params and optimiser state after one step from the initial state, batch and
key of test_flowdiff (params_testing.step_*). A
separate process so that a hang in a collective is a timeout of one test,
not a blocked suite.
"""

import functools
import os
import sys

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=2").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
from jax.sharding import PartitionSpec as P
import numpy as np

import flowdiff_jax  # noqa: F401  (XLA workarounds first)

jax.config.update("jax_threefry_partitionable", True)

from flowdiff_jax import parallel, step as step_lib  # noqa: E402
import params_testing  # noqa: E402


def flat(tree):
  return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(tree))]


def main(method: str, out: str) -> None:
  config, batch = params_testing.step_config(method), params_testing.step_batch()
  state0, rng = params_testing.step_state(config, batch), jax.random.key(2)
  fresh = lambda: jax.tree.map(np.copy, state0)
  n = jax.device_count()
  mesh = parallel.make_mesh(jax.devices())
  mapped = functools.partial(step_lib.train_step, axis_name="data")
  results = {"shard_map": jax.jit(jax.shard_map(
      mapped, mesh=mesh, in_specs=(P(), P("data"), P()), out_specs=(P(), P())))(
          fresh(), batch, rng)}
  per_device = jax.tree.map(lambda a: a.reshape((n, -1) + a.shape[1:]), batch)
  state_p, metrics_p = jax.pmap(mapped, axis_name="data", in_axes=(None, 0, None))(
      fresh(), per_device, rng)
  for a, b in zip(flat(state_p.params), flat(state_p.params)):
    np.testing.assert_array_equal(a[0], b[-1])  # every device holds the same update
  results["pmap"] = jax.tree.map(lambda a: a[0], (state_p, metrics_p))
  arrays = {}
  for form, (state, metrics) in results.items():
    for k, v in jax.device_get(metrics).items():
      arrays[f"{form}|metric|{k}"] = np.asarray(v)
    for i, x in enumerate(flat((state.params, state.opt_state))):
      arrays[f"{form}|state|{i}"] = x
  np.savez(out, **arrays)


if __name__ == "__main__":
  for method in sys.argv[2:]:
    main(method, os.path.join(sys.argv[1], f"{method}.npz"))
