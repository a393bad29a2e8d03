# The two commands of the README. Both set everything up on a fresh machine:
# the Debian Fashion-MNIST files (where apt-get exists), a virtualenv in .venv
# with requirements-dev.txt (requirements.txt, then the test and lint tools) and
# this package in editable mode with its `train` and `dev` extras.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
FMNIST := /usr/share/datasets/fashion-mnist

.PHONY: demo test test-fast lint setup clean

demo: setup  ## Train the embedded quickstart (Fashion-MNIST, offline, CPU, minutes).
	$(PY) -m flowdiff_jax.main --workdir=workdirs/quickstart

test: setup  ## Run the test suite.
	$(PY) -m pytest -q

test-fast: setup  ## The test suite without the tests marked slow, then how many it left out.
	$(PY) -m pytest -q -m "not slow"
	@$(PY) -m pytest -q -n 0 -m slow --collect-only -p no:cacheprovider 2>/dev/null \
	  | sed -nE 's#^([0-9]+)/([0-9]+) tests collected.*#test-fast left out \1 of \2 tests (marked slow; make test runs them).#p'

lint: setup  ## ruff, and the requirements files against pyproject.toml.
	$(VENV)/bin/ruff check .
	$(PY) scripts/check_requirements.py

setup: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	@if [ ! -e $(FMNIST)/train-images-idx3-ubyte.gz ] && command -v apt-get >/dev/null; then \
	  sudo=$$([ "$$(id -u)" -eq 0 ] || echo sudo); \
	  ($$sudo apt-get update -qq && $$sudo apt-get install -y -qq dataset-fashion-mnist) \
	    || echo "Could not install dataset-fashion-mnist; tfds will download Fashion-MNIST instead."; \
	fi
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements-dev.txt -e ".[train,dev]"
	touch $(STAMP)

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
