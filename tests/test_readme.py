"""The README's code examples run as written."""

import os
import re

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tested_blocks():
  text = open(os.path.join(REPO, "README.md")).read()
  return re.findall(r"<!-- tested: tests/test_readme.py -->\n```python\n(.*?)```", text, re.S)


def test_custom_loop_example_runs(capsys):
  blocks = _tested_blocks()
  assert len(blocks) == 1
  namespace = {}
  exec(compile(blocks[0], "README.md", "exec"), namespace)  # noqa: S102
  state, metrics = namespace["state"], namespace["metrics"]
  assert int(state.step) == 3
  assert set(state.params) == {"flow", "score", "gaussian_em"}  # fmnist_noise: the warm start
  assert {"train/loss", "train/dsm_loss", "train/data_fidelity"} <= set(metrics)
  assert "train/loss" in capsys.readouterr().out
