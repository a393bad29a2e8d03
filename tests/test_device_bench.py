"""experiments/bench/device.sh --smoke: the accelerator script and its report run end to end.

On CPU its numbers mean nothing; the test checks that every number the full
run must write is there, finite and where the report expects it.
"""

import json
import math
import os
import subprocess
import sys

import pytest

from runs_testing import REPO, run_env

sys.path.insert(0, os.path.join(REPO, "experiments", "bench"))
import device_report  # from its folder, as device.sh runs it


def test_datasheet_peaks_are_looked_up_by_device_kind():
  assert device_report.datasheet("NVIDIA H200", "bfloat16") == 989.4
  assert device_report.datasheet("NVIDIA A100-SXM4-80GB", "float32") == 156.0
  assert device_report.datasheet("cpu", "bfloat16") is None


@pytest.mark.slow
def test_device_script_smoke_writes_every_number(tmp_path, fmnist_idx_dir):
  out = tmp_path / "device"
  subprocess.run(["bash", os.path.join(REPO, "experiments", "bench", "device.sh"), "--smoke",
                  str(out), "--set", f"data.fmnist_idx_dir={fmnist_idx_dir}",
                  "--set", "data.max_train_examples=64"],
                 check=True, env=run_env(PYTHON=sys.executable), timeout=900,
                 capture_output=True)
  with open(out / "device.json") as f:
    report = json.load(f)
  results = report["results"]
  assert list(results) == ["cifar_bf16", "cifar_f32", "fmnist_k1", "fmnist_k4"]
  assert [r["method"] for r in results["cifar_bf16"]["rows"]] == ["flowdiff", "clean"]
  for name, result in results.items():
    assert result["matmul"].endswith("bfloat16" if name == "cifar_bf16" else "float32")
    for row in result["rows"]:
      for key in ("compile_s", "step_ms", "images_per_s", "tflops_per_s", "of_measured_matmul"):
        assert math.isfinite(row[key]) and row[key] > 0, (name, key, row[key])
      assert row["of_datasheet"] is None  # a CPU has no datasheet entry
  for name, k in (("fmnist_k1", 1), ("fmnist_k4", 4)):
    (row,) = results[name]["rows"]
    assert row["steps_per_dispatch"] == k and row["loop_ms"] > 0
  assert results["fmnist_k1"]["rows"][0]["data_images_per_s"] > 0
  targets = report["targets"]
  assert [t["target"].split(":")[0] for t in targets] == [
      "bf16 joint step, batch 8", "loop within 5 % of the bare step (K = 1)",
      "loop within 5 % of the bare step (K = 4)"]
  assert all(math.isfinite(t["value"]) and isinstance(t["met"], bool) for t in targets)
  assert report["wall_s"] > 0
  assert "| target | measured | met |" in (out / "device.md").read_text()
