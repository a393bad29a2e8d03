"""FlowDiff in JAX/Flax: learning clean image priors from corrupted data.

The core (operators, diffusion, models, methods, step) needs only jax, flax and
optax; the training program (`flowdiff_jax.main`, `train`, `data`,
`checkpoint`) also needs tfds, grain, orbax and clu.

`from flowdiff_jax import train_step` gives the step function (it lives in
`flowdiff_jax.step`); `flowdiff_jax.methods` has one module per method.
"""

# First: XLA flags must be set before JAX starts a backend.
from flowdiff_jax import xla_workarounds  # noqa: F401  (isort: skip)
from flowdiff_jax import diffusion, operators
from flowdiff_jax.models import unet
from flowdiff_jax.parallel import make_mesh
from flowdiff_jax.step import TrainState, create_train_state, make_train_step, train_step

__all__ = ["TrainState", "create_train_state", "diffusion", "make_mesh", "make_train_step",
           "operators", "train_step", "unet"]
