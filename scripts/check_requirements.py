"""Checks that the requirements files list what pyproject.toml declares.

  python scripts/check_requirements.py   (run by `make lint`)

requirements.txt must hold the core dependencies and the `train` extra;
requirements-dev.txt (which includes requirements.txt) the `dev` extra. Each
requirement is compared as written, ranges included, after dropping comments
and blanks. Exit status 1 lists what differs.
"""

import os
import re
import sys
import tomllib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _normalized(requirement: str) -> str:
  """`Foo_Bar >= 1.0` -> `foo-bar>=1.0` (PEP 503 names, no spaces)."""
  requirement = re.sub(r"\s+", "", requirement)
  name = re.match(r"[A-Za-z0-9._-]+", requirement).group(0)
  return re.sub(r"[-_.]+", "-", name).lower() + requirement[len(name):]


def _read(filename: str) -> set[str]:
  """A requirements file's requirements, without its `-r` includes."""
  with open(os.path.join(REPO, filename)) as f:
    lines = (line.split("#", 1)[0].strip() for line in f)
    return {_normalized(line) for line in lines if line and not line.startswith("-")}


def main() -> int:
  with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
    project = tomllib.load(f)["project"]
  extras = project["optional-dependencies"]
  expected = {
      "requirements.txt": {_normalized(r) for r in project["dependencies"] + extras["train"]},
      "requirements-dev.txt": {_normalized(r) for r in extras["dev"]},
  }
  ok = True
  for filename, want in expected.items():
    have = _read(filename)
    for requirement in sorted(want - have):
      print(f"{filename} lacks {requirement} (pyproject.toml has it)")
    for requirement in sorted(have - want):
      print(f"{filename} has {requirement}, pyproject.toml does not")
    ok = ok and want == have
  return 0 if ok else 1


if __name__ == "__main__":
  sys.exit(main())
