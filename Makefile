# Two commands do all the set-up on a fresh machine:
#   make run    creates .venv, installs pinned dependencies, runs the main job on the embedded digits data
#   make test   creates .venv, installs pinned dependencies, runs the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
# LAPACK/OpenBLAS threads fight XLA's own threads on small CPUs (see docs): one thread is faster
export OPENBLAS_NUM_THREADS ?= 1

.PHONY: run test test-slow bench sweep venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c requirements.lock -e '.[dev]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/python -m experiments reproduce --config configs/digits.yaml

test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 -m "not slow"

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 -m slow

sweep: $(STAMP)
	$(BIN)/python -m experiments sweep --config configs/sweep_digits.yaml

bench: $(STAMP)
	$(BIN)/python -m experiments bench --suite step --publish

clean:
	rm -rf $(VENV) results
