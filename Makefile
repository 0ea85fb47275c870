# Two commands do all the set-up on a fresh machine:
#   make run    creates .venv, installs pinned dependencies, runs the main job on the embedded digits data
#   make test   creates .venv, installs pinned dependencies, runs the test suite
# CI (.ci/run) also runs `make lint` (ruff, mypy) and `make docs` (the API reference) before `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
# LAPACK/OpenBLAS threads fight XLA's own threads on small CPUs (see docs): one thread is faster
export OPENBLAS_NUM_THREADS ?= 1

.PHONY: run test test-slow lint docs bench sweep mutation venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c requirements.lock -e '.[dev]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/python -m experiments reproduce --config configs/digits.yaml

# the whole suite with float64 enabled, then the library's core again as users run JAX (x64 off, float32)
test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 -m "not slow"
	DEQ_JAX_TEST_X64=0 $(BIN)/python -m pytest -q -n 2 -m "float32 and not slow" tests/lib

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 -m slow

# the style, held by tools (configured in pyproject.toml): lint and formatting of the whole tree, types of the library;
# all three run and report, then the target fails if any failed
lint: $(STAMP)
	@status=0; \
	$(BIN)/ruff check . || status=1; \
	$(BIN)/ruff format --check --output-format concise . || status=1; \
	$(BIN)/mypy || status=1; \
	exit $$status

# the API reference from the docstrings, into docs/api/ (git-ignored); fails on any warning pdoc gives
docs: $(STAMP)
	$(BIN)/python tools/api_docs.py docs/api

sweep: $(STAMP)
	$(BIN)/python -m experiments sweep --config configs/sweep_digits.yaml

bench: $(STAMP)
	$(BIN)/python -m experiments bench --suite step --publish

# mutation testing of the modules in pyproject.toml's [tool.mutmut] only_mutate (docs/mutation.md): a sample of
# MUTATION_SAMPLE mutants (0: all), at the lowest CPU priority; about 30 minutes on 2 cores for the default 150
MUTATION_SAMPLE ?= 150
mutation: $(STAMP)
	nice -n 19 $(BIN)/python tools/mutation.py --sample $(MUTATION_SAMPLE) --jobs 2

clean:
	rm -rf $(VENV) results docs/api .mypy_cache .ruff_cache mutants .hypothesis
