r"""Training-step benchmark: throughput, compile time, memory and FLOP utilisation.

  python experiments/bench/bench.py                       # the default table
  python experiments/bench/bench.py --configs=cifar_noise --batch_sizes=32 \
      --methods=flowdiff --output=/tmp/bench.json
  python experiments/bench/bench.py --device_counts=1,2,4   # fake-CPU-device scaling

For every (config, method, global batch size) it builds the jitted, sharded,
donated step the training program uses (`train_step.make_train_step`) on a
synthetic batch, then reports:

* compile_s: lowering + XLA compilation of the step (what the first step costs);
* step_ms: the median of `--repeats` timed steps, each ended by
  `block_until_ready`, after `--warmup` untimed ones;
* images_per_s: global batch / step time; per_device: divided by the devices;
* gflop: the step's FLOPs from XLA's cost analysis (per device, as XLA reports
  them for one SPMD partition) and tflops_per_s achieved across devices;
* mfu: achieved FLOP/s over the same machine's measured matmul FLOP/s (a dense
  float32 — or `--dtype` — matmul timed the same way; the practical peak, not
  the datasheet one);
* temp_mib / arg_mib: XLA's memory analysis of the compiled step (device
  buffers for temporaries and for arguments); peak_rss_mib: the process's
  peak host memory so far (on CPU that *is* the device memory);
* loop_ms (with --loop): the step time of the whole training loop — grain data
  pipeline, on-device corruption, step — on Fashion-MNIST configs, to compare
  with the bare step;
* data_images_per_s (with --data): that input pipeline alone, every batch
  waited for (Fashion-MNIST configs).

The speed options of configs/default.py are measured through --set (applied
to every run; documented there):

  --set model.compute_dtype=bfloat16     # bf16 convs/matmuls, float32 params and losses
  --set training.remat=True              # recompute block activations: compare temp_mib
  --set training.steps_per_dispatch=4    # K steps per jitted call (lax.scan)

With steps_per_dispatch K > 1 the step benchmark stacks K batches and times
one dispatch of `train_step.make_train_steps`; step_ms, images_per_s and the
FLOP rates are per step (dispatch time / K), compile_s is that of the K-step
program, and gflop_per_device is the single step's (XLA's cost analysis of a
loop may count its body once). The loop benchmark takes K batches, stacks
them and dispatches once, as the training program does. Compare against a
matmul of the same dtype: `--dtype=bfloat16` with compute_dtype=bfloat16.

--device_counts runs each count in a fresh subprocess with that many fake CPU
devices (XLA_FLAGS=--xla_force_host_platform_device_count=N) and the global
batch scaled with it, so per-device throughput can be compared. On a GPU/TPU
host run it without --device_counts: it measures whatever `jax.devices()` has.
Writes a Markdown table to stdout and everything to --output (JSON).
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--configs", default="quickstart,fmnist_noise,cifar_noise",
                 help="comma-separated config modules under configs/")
  p.add_argument("--methods", default="flowdiff,clean")
  p.add_argument("--batch_sizes", default="8,32", help="global batch sizes")
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--loop", action="store_true",
                 help="also time the full training loop (Fashion-MNIST configs only)")
  p.add_argument("--data", action="store_true",
                 help="also time the data pipeline alone: grain reading + on-device "
                      "corruption (Fashion-MNIST configs only)")
  p.add_argument("--device_counts", default="",
                 help="e.g. 1,2,4: rerun in subprocesses with that many fake CPU devices, "
                      "batch sizes per device")
  p.add_argument("--matmul_size", type=int, default=2048)
  p.add_argument("--dtype", default="float32", help="matmul dtype of the peak measurement")
  p.add_argument("--set", action="append", default=[],
                 help="config overrides applied to every run, e.g. --set training.remat=True")
  p.add_argument("--output", default="", help="JSON file for all results")
  return p.parse_args(argv)


def _apply_override(config, assignment: str) -> None:
  key, value = assignment.split("=", 1)
  *path, leaf = key.split(".")
  node = config
  for name in path:
    node = node[name]
  old = node[leaf]
  if isinstance(old, bool):
    new = value.lower() in ("1", "true", "yes")
  elif isinstance(old, (int, float, str)):
    new = type(old)(value)
  else:
    new = eval(value, {})  # tuples such as (1, 2, 2)
  node[leaf] = new


def matmul_flops_per_s(size: int, dtype: str, repeats: int = 5) -> float:
  """Measured FLOP/s of a [size, size] @ [size, size] matmul on the default device."""
  import jax

  a = jax.random.normal(jax.random.key(0), (size, size), dtype=dtype)
  b = jax.random.normal(jax.random.key(1), (size, size), dtype=dtype)
  f = jax.jit(lambda a, b: a @ b)
  f(a, b).block_until_ready()
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    f(a, b).block_until_ready()
    times.append(time.perf_counter() - t)
  return 2 * size ** 3 / statistics.median(times)


def _synthetic_batch(config, mesh, batch_size: int):
  """A global batch as the training program feeds it: corrupted random uint8 images."""
  import jax
  import numpy as np

  from flowdiff_jax import data, methods, operators, parallel

  shape = data.image_shape(config)
  rng = np.random.default_rng(0)
  raw = {"image": rng.integers(0, 256, (batch_size, *shape), dtype=np.uint8),
         "index": np.arange(batch_size, dtype=np.int32)}
  op = operators.make_operator(config.operator)
  keep = methods.get(config.method).inputs

  def prepare(raw):
    batch = data.prepare_batch(raw, op, config.data.corruption_seed, keep_clean="x" in keep)
    return {k: batch[k] for k in keep}

  return jax.jit(prepare, out_shardings=parallel.batch_sharding(mesh))(raw)


def _flops(stage) -> float:
  """FLOPs of a lowered or compiled program from XLA's cost analysis (nan if none)."""
  cost = stage.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float((cost or {}).get("flops", float("nan")))


def _initial_state(config, mesh, batch):
  """The train state a run starts from, replicated over `mesh`.

  Params that a run fits before training (the flow's Gaussian-EM base) are
  zeros of their shapes here, and `amortized`'s frozen Gaussian prior a standard
  normal: their values do not change what a step costs.
  """
  import jax
  import jax.numpy as jnp

  from flowdiff_jax import methods, parallel, step as step_lib

  method = methods.get(config.method)
  images = batch["y"] if "y" in batch else batch["x"]  # clean methods read x only
  shapes = method.fitted_params_shapes(config, images.shape[1:])
  fitted = None if shapes is None else jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                                                     shapes)
  prior = None
  if method.frozen_prior:  # "amortized": a standard normal prior, of the same cost as any
    if config.amortized.prior != "gaussian":
      raise ValueError("bench.py times `amortized` with amortized.prior=gaussian only")
    d = images[0].size
    prior = {"mean": jnp.zeros(images.shape[1:]), "scale_tril": jnp.eye(d)}
  with jax.threefry_partitionable(False):
    return jax.jit(lambda r, b, p, f: step_lib.create_train_state(
        config, r, b, prior_params=p, fitted_params=f),
                   out_shardings=parallel.replicated(mesh))(jax.random.key(0), batch, prior,
                                                            fitted)


def bench_step(config, *, warmup: int, repeats: int) -> dict:
  """Compile time, median step time, FLOPs and memory of `config`'s jitted train step.

  With training.steps_per_dispatch K > 1 it times the K-step program on K
  stacked batches; the times and rates it reports are per step.
  """
  import jax

  from flowdiff_jax import parallel, step as step_lib, train

  mesh = parallel.make_mesh()
  k = config.training.get("steps_per_dispatch", 1)
  batch = _synthetic_batch(config, mesh, config.training.batch_size)
  state = _initial_state(config, mesh, batch)
  rng = jax.random.key(1)
  if k > 1:
    # The single step's FLOPs, from its HLO: no second compilation.
    flops = _flops(step_lib.make_train_step(config, mesh).lower(state, batch, rng))
    batch = train._make_stack(mesh)([batch] * k)  # noqa: SLF001 (the loop's own)
    step = step_lib.make_train_steps(config, mesh)
  else:
    step = step_lib.make_train_step(config, mesh)

  t = time.perf_counter()
  compiled = step.lower(state, batch, rng).compile()
  compile_s = time.perf_counter() - t
  if k == 1:
    flops = _flops(compiled)
  memory = compiled.memory_analysis()

  for _ in range(warmup):
    state, metrics = compiled(state, batch, rng)
  jax.block_until_ready((state, metrics))
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    state, metrics = compiled(state, batch, rng)
    jax.block_until_ready((state, metrics))
    times.append((time.perf_counter() - t) / k)
  step_s = statistics.median(times)
  n = jax.device_count()
  result = {
      "steps_per_dispatch": k, "compile_s": compile_s, "step_ms": 1e3 * step_s,
      "step_ms_min": 1e3 * min(times), "step_ms_max": 1e3 * max(times),
      "images_per_s": config.training.batch_size / step_s,
      "images_per_s_per_device": config.training.batch_size / step_s / n,
      "gflop_per_device": flops / 1e9,
      "tflops_per_s": flops * n / step_s / 1e12,
      "num_devices": n,
      "params_m": sum(x.size for x in jax.tree.leaves(state.params)) / 1e6,
      "loss_finite": (bool(jax.numpy.all(jax.numpy.isfinite(metrics["train/loss"])))
                      if "train/loss" in metrics else None),
  }
  if memory is not None:
    result["temp_mib"] = memory.temp_size_in_bytes / 2 ** 20
    result["arg_mib"] = memory.argument_size_in_bytes / 2 ** 20
  stats = jax.devices()[0].memory_stats() or {}
  if "peak_bytes_in_use" in stats:
    result["device_peak_mib"] = stats["peak_bytes_in_use"] / 2 ** 20
  return result


def bench_loop(config, *, warmup: int, repeats: int) -> dict:
  """Mean step time of the real loop: grain pipeline + on-device corruption + step.

  With training.steps_per_dispatch K > 1, each of the `repeats` dispatches
  takes K batches, stacks them and runs K steps; loop_ms is per step.
  """
  import jax

  from flowdiff_jax import data, parallel, step as step_lib, train

  mesh = parallel.make_mesh()
  prepare = train._make_prepare(config, mesh, for_eval=False)  # noqa: SLF001 (the loop's own)
  source = data.make_source(config, "train")
  it = iter(data.train_dataset(config, source))
  state = _initial_state(config, mesh, prepare(next(it)))
  k = config.training.get("steps_per_dispatch", 1)
  if k > 1:
    steps, stack = step_lib.make_train_steps(config, mesh), train._make_stack(mesh)  # noqa: SLF001
    step = lambda state, rng: steps(
        state, stack([prepare(next(it)) for _ in range(k)]), rng)
  else:
    single = step_lib.make_train_step(config, mesh)
    step = lambda state, rng: single(state, prepare(next(it)), rng)
  rng = jax.random.key(1)
  for _ in range(warmup):
    state, metrics = step(state, rng)
  jax.block_until_ready((state, metrics))
  # As in train.py: no sync inside the loop; the metrics stay on device.
  t = time.perf_counter()
  history = []
  for _ in range(repeats):
    state, metrics = step(state, rng)
    history.append(metrics)
  jax.block_until_ready((state, history))
  return {"loop_ms": 1e3 * (time.perf_counter() - t) / (repeats * k)}


def bench_data(config, *, batches: int) -> dict:
  """Images/s of the loop's input alone: grain pipeline, transfer, on-device corruption."""
  import jax

  from flowdiff_jax import data, parallel, train

  mesh = parallel.make_mesh()
  prepare = train._make_prepare(config, mesh, for_eval=False)  # noqa: SLF001 (the loop's own)
  it = iter(data.train_dataset(config, data.make_source(config, "train")))
  jax.block_until_ready(prepare(next(it)))  # compiles the corruption
  t = time.perf_counter()
  for _ in range(batches):
    jax.block_until_ready(prepare(next(it)))
  return {"data_images_per_s": batches * config.training.batch_size
          / (time.perf_counter() - t)}


def run_all(args) -> list[dict]:
  import jax

  import flowdiff_jax  # noqa: F401 (XLA workarounds before the first computation)
  from flowdiff_jax.validate import validate_config

  jax.config.update("jax_threefry_partitionable", True)
  rows = []
  per_device = bool(os.environ.get("BENCH_PER_DEVICE_BATCH"))
  for name in args.configs.split(","):
    module = importlib.import_module(f"flowdiff_jax.configs.{name}")
    for method in args.methods.split(","):
      for bs in (int(b) for b in args.batch_sizes.split(",")):
        config = module.get_config()
        config.method = method
        config.training.batch_size = bs * (jax.device_count() if per_device else 1)
        for assignment in args.set:
          _apply_override(config, assignment)
        # The benchmark runs no logging, evaluation or checkpoints: their
        # intervals are only rounded up to multiples of K so the config validates.
        k = config.training.steps_per_dispatch
        for field in ("num_train_steps", "log_every_steps", "eval_every_steps",
                      "sample_every_steps", "checkpoint_every_steps"):
          config.training[field] = -(-config.training[field] // k) * k
        validate_config(config, num_devices=jax.device_count(), num_processes=1)
        row = {"config": name, "method": method, "batch_size": config.training.batch_size,
               "overrides": list(args.set)}
        print(f"# {name} {method} batch {config.training.batch_size} ...", file=sys.stderr,
              flush=True)
        row.update(bench_step(config, warmup=args.warmup, repeats=args.repeats))
        if args.loop and config.data.dataset == "fashion_mnist":
          row.update(bench_loop(config, warmup=args.warmup, repeats=max(args.repeats, 10)))
        if args.data and config.data.dataset == "fashion_mnist":
          row.update(bench_data(config, batches=max(args.repeats, 20)))
        row["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        rows.append(row)
  return rows


def _table(rows: list[dict], peak: float) -> str:
  cols = [("config", "{}"), ("method", "{}"), ("batch_size", "{}"), ("num_devices", "{}"),
          ("steps_per_dispatch", "{}"),
          ("params_m", "{:.1f}"), ("compile_s", "{:.1f}"), ("step_ms", "{:.1f}"),
          ("loop_ms", "{:.1f}"), ("images_per_s", "{:.1f}"),
          ("images_per_s_per_device", "{:.1f}"), ("gflop_per_device", "{:.1f}"),
          ("tflops_per_s", "{:.3f}"), ("mfu", "{:.0%}"), ("temp_mib", "{:.0f}"),
          ("peak_rss_mib", "{:.0f}")]
  for r in rows:
    r["mfu"] = r["tflops_per_s"] * 1e12 / peak
  lines = ["| " + " | ".join(c for c, _ in cols) + " |", "|" + "---|" * len(cols)]
  for r in rows:
    lines.append("| " + " | ".join(fmt.format(r[c]) if c in r else "–" for c, fmt in cols)
                 + " |")
  return "\n".join(lines)


def main(argv=None) -> None:
  args = _parse_args(argv)
  if args.device_counts:
    rows, peaks = [], []
    for n in (int(c) for c in args.device_counts.split(",")):
      env = dict(os.environ, BENCH_PER_DEVICE_BATCH="1", JAX_PLATFORMS="cpu",
                 XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} "
                           f"--xla_force_host_platform_device_count={n}".strip())
      cmd = [sys.executable, os.path.abspath(__file__), "--output=/dev/stdout"] + [
          a for a in (argv or sys.argv[1:]) if not a.startswith(("--device_counts", "--output"))]
      out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True,
                           cwd=REPO).stdout
      result = json.loads(out[out.index("{\n"):])
      rows += result["rows"]
      peaks.append(result["matmul_tflops_per_s"])
    peak = max(peaks) * 1e12
  else:
    import jax

    import flowdiff_jax  # noqa: F401

    peak = matmul_flops_per_s(args.matmul_size, args.dtype)
    rows = run_all(args)
  import jax

  info = {"date": datetime.date.today().isoformat(), "host": platform.node(),
          "cpu_count": os.cpu_count(), "platform": jax.default_backend(),
          "device_kind": jax.devices()[0].device_kind, "jax": jax.__version__,
          "matmul_tflops_per_s": peak / 1e12, "matmul": f"{args.matmul_size}² {args.dtype}",
          "command": " ".join([os.path.basename(sys.executable)] + sys.argv), "rows": rows}
  if args.output != "/dev/stdout":
    print(f"{info['date']}, {info['device_kind']} ({info['platform']}), {info['cpu_count']} "
          f"CPUs, jax {info['jax']}; matmul peak {info['matmul_tflops_per_s']:.3f} TFLOP/s "
          f"({info['matmul']})\n")
    print(_table(rows, peak))
  if args.output:
    with open(args.output, "w") as f:
      json.dump(info, f, indent=2)
      f.write("\n")


if __name__ == "__main__":
  sys.path.insert(0, REPO)
  main()
