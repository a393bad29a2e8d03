r"""Posterior sampling speed: the amortized flow against the E-step samplers, same batch.

  python experiments/bench/posterior_speed.py --workdir=workdirs/fmnist/denoise_flowdiff_warm \
      [--batch 64] [--steps 32] [--repeats 3] [--out experiments/bench/posterior_speed.json]

On one trained flowdiff run (its flow and its diffusion prior) and one batch of
its held-out observations, times, after a compile-and-warm-up call:
  * flow: one posterior sample per observation (one pass of the flow);
  * mmps: MMPS under the run's prior, --steps steps (+1), 1 CG iteration (the
    em_mmps rows' E-step sampler);
  * dps: DPS under the run's prior, --steps steps (+1) (the em_dps rows').
Prints images/s (best of --repeats) and writes them with the hardware to --out.
"""

import argparse
import os
import time

import jax

from flowdiff_jax import data, paths, reporting, runs, solvers, step as step_lib


def _best_time(fn, repeats):
  jax.block_until_ready(fn())  # compile and warm up
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    best = min(best, time.perf_counter() - start)
  return best


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--steps", type=int, default=32)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__),
                                                    "posterior_speed.json"))
  args = parser.parse_args()
  config, state = runs.load_run(args.workdir)
  config.eval.batch_size = args.batch
  run_data = data.RunData.open(config, None)
  op = state.objective.operator
  raw = next(iter(run_data.eval_batches()))
  batch = data.prepare_batch(raw, op, config.data.corruption_seed, keep_clean=False)
  y, omega = batch["y"], batch["omega"]
  keys = solvers.example_keys(0, raw["index"])
  obj = state.objective
  params = state.ema_params["score"]
  eps = lambda p: (lambda x, t: obj.score_net.apply({"params": p}, x, t, train=False))
  flow = jax.jit(lambda s, b, k: step_lib.posterior_samples(s, b, k, 1))
  make = {"mmps": solvers.MMPS(num_steps=args.steps, cg_iters=1),
          "dps": solvers.DPS(zeta=3.0, num_steps=args.steps)}
  solve = {name: jax.jit(lambda p, y, w, k, s=s: solvers.solve(s, eps(p), obj.schedule, op, y,
                                                                 w, k))
           for name, s in make.items()}
  timings = {"flow": _best_time(lambda: flow(state, {"y": y, "omega": omega},
                                             jax.random.key(0)), args.repeats)}
  for name, fn in solve.items():
    timings[name] = _best_time(lambda fn=fn: fn(params, y, omega, keys), args.repeats)
  rows = {name: {"seconds": round(t, 3), "images_per_s": round(args.batch / t, 2)}
          for name, t in timings.items()}
  for name, r in rows.items():
    print(f"{name:5s}: {r['seconds']:8.3f} s for {args.batch} posterior samples "
          f"({r['images_per_s']:.2f} images/s; {timings[name] / timings['flow']:.0f}x the flow)")
  report = {"workdir": args.workdir, "method": config.method, "operator": op.name,
            "batch": args.batch, "solver_steps": args.steps, "rows": rows,
            "flow_params": sum(x.size for x in jax.tree.leaves(state.params["flow"])),
            "score_params": sum(x.size for x in jax.tree.leaves(params)),
            "hardware": reporting.hardware(), "date": time.strftime("%Y-%m-%d"),
            "command": "python experiments/bench/posterior_speed.py --workdir=" + args.workdir}
  paths.write_json(args.out, report)


if __name__ == "__main__":
  main()
