"""FlowDiff in JAX/Flax: learning clean image priors from corrupted data.

The core (operators, diffusion, models, train_step) needs only jax, flax and
optax; the training program (`flowdiff_jax.main`, `train`, `data`,
`checkpoint`) also needs tfds, grain, orbax and clu.

The step function is imported from its module,
`from flowdiff_jax.train_step import train_step`: re-exporting it here would
shadow the module `flowdiff_jax.train_step` with the function of the same name.
"""

# First: XLA flags must be set before JAX starts a backend.
from flowdiff_jax import xla_workarounds  # noqa: F401  (isort: skip)
from flowdiff_jax import diffusion, operators
from flowdiff_jax.models import unet
from flowdiff_jax.train_step import TrainState, create_train_state, make_mesh, make_train_step

__all__ = ["TrainState", "create_train_state", "diffusion", "make_mesh", "make_train_step",
           "operators", "unet"]
