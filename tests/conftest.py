"""Test set-up: four fake CPU devices, set before jax is first imported."""
import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# TensorFlow (pulled in by clu/tfds) must never grab a GPU or spam the log.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import flowdiff_jax  # noqa: E402,F401  (its XLA bug workarounds, before jax starts)
import jax  # noqa: E402

jax.config.update("jax_threefry_partitionable", True)

# Several tests compile the same tiny programs (e.g. a run and its resume):
# a persistent cache for the session compiles each once.
_CACHE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".pytest_cache", "jax")
jax.config.update("jax_compilation_cache_dir", os.path.abspath(_CACHE))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
