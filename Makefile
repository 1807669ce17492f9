# nephele: the two commands a new user runs are `make demo` and `make test`.
# Both install what they need (tools/bootstrap.sh) and are safe to re-run.
VENV ?= .venv
PY := $(VENV)/bin/python
export NUMBA_CACHE_DIR ?= $(CURDIR)/.cache/numba

.PHONY: faults all bootstrap test unit fuzz check lint typecheck demo bench clean
all: test

bootstrap:
	@tools/bootstrap.sh

## make test: lint, type check, layer contract, then every test (unit and integration)
test: bootstrap check
	tools/test.sh

## make unit: only the tests that need no VM, node or namespace
unit: bootstrap
	$(PY) -m pytest -q -m "not integration"

## make faults: only the handoff fault matrix on real nodes (phase x fault, ~9 min; docs/faults.md; also in make test)
faults: bootstrap
	$(PY) -m pytest -q tests/handoff/test_fault_matrix.py

## make fuzz: the fuzz suite (tests/fuzz) with 30x the examples of its pass in `make test`, fresh random
## inputs each run (docs/fuzzing.md)
fuzz: bootstrap
	NEPHELE_FUZZ=long $(PY) -m pytest -q tests/fuzz

check: lint typecheck

lint: bootstrap
	$(VENV)/bin/ruff check nephele tests bench tools
	$(VENV)/bin/ruff format --check nephele tests bench tools

typecheck: bootstrap
	$(VENV)/bin/mypy

## make demo: the main job, end to end (see README)
demo: bootstrap
	@tools/demo.sh

bench: bootstrap
	$(PY) bench/plan_scale.py
	$(PY) bench/delta_vs_tools.py

clean:
	rm -rf $(VENV) .cache .mypy_cache .pytest_cache .ruff_cache
