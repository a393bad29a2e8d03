"""Plain helper functions shared by several test files (and tests/manual_forms.py).

Fixtures live in conftest.py; this module holds what test modules call at
import time or from their own helpers, where a fixture cannot be used. No test
file imports another test_*.py file: what two of them share is here.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from flowdiff_jax import step as step_lib
from flowdiff_jax.configs import tiny


@functools.partial(jax.jit, static_argnums=2)
def perturb(params, seed, scale=0.05):
  """params + fixed pseudo-random offsets of size ~scale on every leaf.

  Moves zero-initialised layers (identity couplings, zero heads) to a generic
  point so that tests of invertibility or input dependence are not trivially
  true. Built from sin of an index, which compiles much faster on CPU than one
  random draw per leaf.
  """
  leaves, treedef = jax.tree.flatten(params)
  out = []
  for i, p in enumerate(leaves):
    phase = jnp.arange(p.size, dtype=jnp.float32) * 0.618034 + 2.71 * i + seed
    out.append(p + scale * jnp.sin(131.0 * phase).reshape(p.shape))
  return jax.tree.unflatten(treedef, out)


def observation_batch(seed=1, n=8, size=8):
  """A training batch of n uniform [-1, 1] single-channel size×size observations, no ω."""
  y = jax.random.uniform(jax.random.key(seed), (n, size, size, 1), minval=-1, maxval=1)
  return {"y": y, "omega": {}}


# --------------------------------------------------------------------------
# Networks (test_flow.py, test_perf_options.py).
# --------------------------------------------------------------------------


def rbg_key(seed):
  """A "rbg" key: with jax_threefry_partitionable (conftest) threefry draws
  compile much more slowly on CPU."""
  return jax.random.key(seed, impl="rbg")


def normal(seed, shape, scale=1.0, shift=0.0):
  """float32 shift + scale * N(0, 1) of `shape`, from rbg_key(seed)."""
  return shift + scale * jax.random.normal(rbg_key(seed), shape, jnp.float32)


def jit_init(module, *args, **kwargs):
  """module.init(rbg_key(0), *args, **kwargs), jitted, with the faster-compiling threefry."""
  with jax.threefry_partitionable(False):
    return jax.jit(functools.partial(module.init, **kwargs))(rbg_key(0), *args)


def jacobian_logdet(fn, x):
  """log|det ∂fn/∂x| of fn: [1, H, W, C] -> [1, H, W, C], flattened, in float64."""
  flat = lambda v: fn(v.reshape(x.shape)).reshape(-1)
  jac = jax.jacfwd(flat)(x.reshape(-1))
  sign, logdet = np.linalg.slogdet(np.asarray(jac, np.float64))
  assert sign != 0
  return logdet


# --------------------------------------------------------------------------
# The joint train step on 8x8 images (test_flowdiff.py, tests/manual_forms.py).
# --------------------------------------------------------------------------

STEP_IMAGE_SIZE = 8


def step_config(method="flowdiff"):
  """8x8 images and the Gaussian ε-network: a step compiles in seconds, not a minute.

  The U-Net inside the joint step is covered end to end in test_train.py.
  """
  config = tiny.get_config()
  config.method = method
  config.data.image_size = STEP_IMAGE_SIZE
  config.model.name = "gaussian"
  config.amortized.num_time_samples = 2
  return config


def step_batch(seed=1):
  """observation_batch of STEP_IMAGE_SIZE images."""
  return observation_batch(seed, size=STEP_IMAGE_SIZE)


def step_state(config, batch):
  """The initial train state, on the host; as the training program makes it: jitted
  init, with the faster-compiling threefry."""
  with jax.threefry_partitionable(False):
    init = jax.jit(functools.partial(step_lib.create_train_state, config))
    return jax.device_get(init(jax.random.key(0), batch))
