# The two commands of the README. Both set everything up on a fresh machine:
# the Debian Fashion-MNIST files (where apt-get exists), a virtualenv in .venv
# with requirements.txt, and this package in editable mode.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
FMNIST := /usr/share/datasets/fashion-mnist

.PHONY: demo test setup clean

demo: setup  ## Train the embedded quickstart (Fashion-MNIST, offline, CPU, minutes).
	$(PY) -m flowdiff_jax.main --workdir=workdirs/quickstart

test: setup  ## Run the test suite.
	$(PY) -m pytest -q

setup: $(STAMP)

$(STAMP): requirements.txt setup.cfg
	@if [ ! -e $(FMNIST)/train-images-idx3-ubyte.gz ] && command -v apt-get >/dev/null; then \
	  sudo=$$([ "$$(id -u)" -eq 0 ] || echo sudo); \
	  ($$sudo apt-get update -qq && $$sudo apt-get install -y -qq dataset-fashion-mnist) \
	    || echo "Could not install dataset-fashion-mnist; tfds will download Fashion-MNIST instead."; \
	fi
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt -e .
	touch $(STAMP)

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
