r"""Merges device.sh's bench.py results into device.json and prints the summary.

  python experiments/bench/device_report.py OUT [--wall_s=SECONDS]

Reads OUT/{cifar_bf16,cifar_f32,fmnist_k1,fmnist_k4}.json (bench.py's output)
and writes OUT/device.json: those results, each step's FLOP/s as a fraction of
the same run's measured matmul and of the device's datasheet peak (where the
device is in DATASHEET_TFLOPS), and issue 19's accelerator targets with the
measured value and whether it is met:

* bf16 joint step >= 40 % of the measured bf16 matmul FLOP/s (CIFAR, each batch);
* the training loop within 5 % of the bare step (Fashion-MNIST, K = 1 and 4).

Standard library only.
"""

from __future__ import annotations

import argparse
import json
import os

STEPS = ("cifar_bf16", "cifar_f32", "fmnist_k1", "fmnist_k4")
# Dense peak TFLOP/s from the vendors' datasheets (SXM parts, no sparsity);
# float32 matmuls run on the tensor cores as TF32 under XLA's default precision.
DATASHEET_TFLOPS = {
    "H200": {"bfloat16": 989.4, "float32": 494.7},
    "H100": {"bfloat16": 989.4, "float32": 494.7},
    "A100": {"bfloat16": 312.0, "float32": 156.0},
}
TARGETS = {"bf16_joint_of_matmul": 0.40, "loop_over_step": 1.05}


def datasheet(device_kind: str, dtype: str) -> float | None:
  for name, peaks in DATASHEET_TFLOPS.items():
    if name in device_kind:
      return peaks.get(dtype)
  return None


def build(out: str, wall_s: float | None = None) -> dict:
  results, targets = {}, []
  for name in STEPS:
    path = os.path.join(out, f"{name}.json")
    with open(path) as f:
      result = json.load(f)
    dtype = "bfloat16" if name.endswith("bf16") else "float32"
    peak = datasheet(result["device_kind"], dtype)
    for row in result["rows"]:
      row["of_measured_matmul"] = row["tflops_per_s"] / result["matmul_tflops_per_s"]
      row["of_datasheet"] = row["tflops_per_s"] / peak if peak else None
      if name == "cifar_bf16" and row["method"] == "flowdiff":
        targets.append(dict(
            target=f"bf16 joint step, batch {row['batch_size']}: >= 40 % of the measured "
                   "bf16 matmul FLOP/s",
            value=row["of_measured_matmul"],
            met=row["of_measured_matmul"] >= TARGETS["bf16_joint_of_matmul"]))
      if "loop_ms" in row:
        ratio = row["loop_ms"] / row["step_ms"]
        row["loop_over_step"] = ratio
        k = row.get("steps_per_dispatch", 1)
        targets.append(dict(target=f"loop within 5 % of the bare step (K = {k})",
                            value=ratio, met=ratio <= TARGETS["loop_over_step"]))
    results[name] = result
  first = results[STEPS[0]]
  return {"date": first["date"], "device_kind": first["device_kind"],
          "platform": first["platform"], "jax": first["jax"], "wall_s": wall_s,
          "targets": targets, "results": results}


def markdown(report: dict) -> str:
  lines = [f"{report['date']}, {report['device_kind']} ({report['platform']}), "
           f"jax {report['jax']}, device.sh wall time {report['wall_s']} s", "",
           "| step | method | batch | K | compile (s) | step (ms) | loop (ms) | images/s "
           "| data images/s | TFLOP/s | of measured matmul | of datasheet | memory (MiB) |",
           "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]

  def fmt(value, spec):
    return "–" if value is None else format(value, spec)

  for name, result in report["results"].items():
    for r in result["rows"]:
      memory = r.get("device_peak_mib", r.get("temp_mib"))
      lines.append(
          f"| {name} | {r['method']} | {r['batch_size']} | {r.get('steps_per_dispatch', 1)} "
          f"| {fmt(r.get('compile_s'), '.1f')} | {fmt(r.get('step_ms'), '.2f')} "
          f"| {fmt(r.get('loop_ms'), '.2f')} | {fmt(r.get('images_per_s'), '.0f')} "
          f"| {fmt(r.get('data_images_per_s'), '.0f')} | {fmt(r.get('tflops_per_s'), '.3f')} "
          f"| {fmt(r['of_measured_matmul'], '.0%')} | {fmt(r['of_datasheet'], '.0%')} "
          f"| {fmt(memory, '.0f')} |")
  lines += ["", "| target | measured | met |", "|---|---:|---|"]
  for t in report["targets"]:
    lines.append(f"| {t['target']} | {t['value']:.3f} | {'yes' if t['met'] else 'no'} |")
  return "\n".join(lines)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("out")
  p.add_argument("--wall_s", type=float, default=None)
  args = p.parse_args()
  report = build(args.out, args.wall_s)
  with open(os.path.join(args.out, "device.json"), "w") as f:
    json.dump(report, f, indent=1)
    f.write("\n")
  print(markdown(report))


if __name__ == "__main__":
  main()
