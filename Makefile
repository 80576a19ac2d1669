# One-command set-up on a fresh machine: `make demo` runs the main job, `make test` the tests.
# Everything (the virtualenv, PyTorch, Prefect, the SeaweedFS binary) is installed from here.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# Browser tests drive Debian's Chromium (never a downloaded browser build).
CHROMIUM := /usr/bin/chromium

# Quiet, offline-friendly Prefect defaults for the embedded (ephemeral) server.
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export DO_NOT_TRACK ?= 1
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS ?= 180

.PHONY: install demo lint test test-fast bench clean up down status

install: $(STAMP) $(CHROMIUM)

$(CHROMIUM):
	@if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; \
	else sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; fi

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch/torchvision are pinned in pyproject.toml; pip takes them from local disk here.
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: install
	$(BIN)/nst demo

# Lint first (ruff: pyproject's [tool.ruff]; mypy: [tool.mypy]), then the tests.
lint: install
	$(BIN)/ruff check .
	$(BIN)/mypy

test: install lint
	$(BIN)/pytest

test-fast: install
	$(BIN)/pytest -m "not slow"

bench: install
	$(BIN)/python benchmarks/engine.py

clean:
	rm -rf $(VENV) .pytest_cache nst-demo-output test-output

# The local stack on 127.0.0.1 (infra/stack.py): Prefect server with API auth, SeaweedFS S3 with the
# samples, a process work pool with one worker, the deployments of infra/prefect.yaml. Data in $(STACK_DIR)/.
STACK_DIR ?= .stack

up: $(STAMP)
	$(BIN)/python -m infra.stack up --dir $(STACK_DIR)

down:
	@if [ -x $(BIN)/python ]; then $(BIN)/python -m infra.stack down --dir $(STACK_DIR); fi

status:
	@$(BIN)/python -m infra.stack status --dir $(STACK_DIR)
