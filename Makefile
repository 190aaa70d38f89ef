# The two commands a fresh clone needs:
#   make run    install, then run the whole lifecycle on the embedded default (dvc repro)
#   make test   install, then run the test suite (what CI runs: .ci/run)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: run test install install-test

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# torch first, pinned: on this CPU machine pip takes the local CPU wheel instead of a multi-GB CUDA build.
install: $(BIN)/python
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e .

install-test: install
	$(BIN)/pip install --quiet -e ".[test]"

# Ends with the evaluation table (every model, same suites); `dvc metrics show` has every stage's metrics.
run: install
	PATH="$(abspath $(BIN)):$$PATH" dvc repro
	@echo ""; echo "reports/evaluate.md (all metrics: .venv/bin/dvc metrics show):"
	@sed -n '/^| model | perplexity/,/^$$/p' reports/evaluate.md

test: install-test
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m pytest -q $(PYTEST_ARGS)
