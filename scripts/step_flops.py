r"""FLOPs of one training step and of one sampler step, from XLA's cost analysis (no training).

  python scripts/step_flops.py --config=configs/cifar_noise.py [--config.method=naive]

Prints the forward+backward FLOPs of `train_step` at the config's global
batch size, and of one ε-network evaluation for sampling a batch of 250
(what `flowdiff_jax.evaluate` does per sampler step), as XLA counts them on
the CPU lowering (no kernel fusion effects; a multiply-add counts 2). Used to
state the expected compute of the paper-protocol runs (experiments/cifar10,
experiments/celeba) without a GPU: nothing is compiled or run.
"""

import functools

from absl import app
import jax
import jax.numpy as jnp
from ml_collections import config_flags

import flowdiff_jax  # noqa: F401  (XLA workarounds)
from flowdiff_jax import data, methods, step as step_lib

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.")


def _flops(lowered) -> float:
  cost = lowered.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost["flops"])


def main(argv):
  del argv
  config = _CONFIG.value
  shape = data.image_shape(config)
  b = config.training.batch_size
  batch = {"x": jnp.zeros((b, *shape)), "y": jnp.zeros((b, *shape)),
           "omega": ({"mask": jnp.ones((b, *shape[:2], 1))}
                     if config.operator.name.startswith("inpaint") else {})}
  batch = {k: batch[k] for k in methods.get(config.method).inputs}
  if config.method == "amortized":
    raise SystemExit("amortized needs a prior run; count flowdiff instead")
  state = jax.eval_shape(functools.partial(step_lib.create_train_state, config),
                         jax.random.key(0), batch)
  step = jax.jit(step_lib.train_step).lower(state, batch, jax.random.key(1))
  flops = _flops(step)
  params = sum(x.size for x in jax.tree.leaves(state.params))
  print(f"{config.method}: {params / 1e6:.2f}M params; train step at batch {b}: "
        f"{flops / 1e12:.3f} TFLOP ({flops / b / 1e9:.2f} GFLOP per example)")
  if methods.get(config.method).has_prior:
    eps = jax.jit(lambda p, x, t: methods.base.eps_fn(state.objective, p)(x, t)).lower(
        state.ema_params["score"], jnp.zeros((250, *shape)), jnp.zeros((250,)))
    eps_flops = _flops(eps)
    print(f"sampling: one ε-network evaluation of 250 images: {eps_flops / 1e12:.3f} TFLOP "
          f"({eps_flops / 250 / 1e9:.2f} GFLOP per image)")


if __name__ == "__main__":
  app.run(main)
