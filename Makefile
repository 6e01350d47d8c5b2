# The two commands of the README:
#   make demo   set up .venv (once) and run the built-in demo end to end
#   make test   set up .venv (once), lint, type-check and run the whole test suite
# Set-up is skipped when pyproject.toml and constraints.txt have not changed.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=
COVERAGE_ARGS ?=

.PHONY: demo test lint typecheck unit bench diagnose-sweep coverage clean constraints

$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade "pip>=24"
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[all,dev]"
	$(BIN)/python -m pip check
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/portable-models demo --out dist/demo

lint: $(STAMP)
	$(BIN)/ruff check .

typecheck: $(STAMP)
	$(BIN)/mypy

test: lint typecheck
	$(BIN)/python -m pytest $(PYTEST_ARGS)

unit: $(STAMP)
	$(BIN)/python -m pytest tests/unit $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python bench/run.py

# diagnose on a fault seeded in every layer with weights of three models, all five targets
# (~15 min on 2 cores): the tally goes to docs/diagnose_sweep.md
diagnose-sweep: $(STAMP)
	PM_DIAGNOSE_SWEEP=all $(BIN)/python -m pytest -s tests/integration/test_diagnose_faults.py -k "seeded or intact"

# the coverage corpus (44 architectures x 5 targets, 40 min with 2 jobs on 2 idle cores; resumable):
# the matrix goes to coverage/results.md. Not part of `make test`. E.g.
#   make coverage COVERAGE_ARGS="--only bert,llama"   or   COVERAGE_ARGS=--fresh
coverage: $(STAMP)
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[coverage]"
	$(BIN)/python coverage/run.py $(COVERAGE_ARGS)

# Regenerate constraints.txt from the current .venv (after a deliberate upgrade).
constraints: $(STAMP)
	$(BIN)/python tools/freeze_constraints.py > constraints.txt

clean:
	rm -rf $(VENV) dist .pytest_cache .mypy_cache .ruff_cache bench/results
