# One-command set-up on a fresh machine: `make demo` runs the main job, `make test` the tests.
# Everything (the virtualenv, PyTorch, Prefect, the SeaweedFS binary) is installed from here, at the
# versions in constraints.txt (the ones the suite passed with; `make constraints` rewrites it).

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/pip install --quiet -c constraints.txt
# What the demo needs (the package alone), and what the tests need on top (extras, a browser).
STAMP_RUN  := $(VENV)/.installed-run
STAMP_TEST := $(VENV)/.installed-test
# Browser tests drive Debian's Chromium (never a downloaded browser build).
CHROMIUM := /usr/bin/chromium

# Quiet, offline-friendly Prefect defaults for the embedded (ephemeral) server.
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export DO_NOT_TRACK ?= 1
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS ?= 180

.PHONY: install install-test demo lint test test-fast bench device-wheels constraints clean up down status prefect.yaml

install: $(STAMP_RUN)

install-test: $(STAMP_TEST) $(CHROMIUM)

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# torch/torchvision are pinned in pyproject.toml; pip takes them from local disk here.
$(STAMP_RUN): pyproject.toml constraints.txt | $(VENV)/bin/python
	$(PIP) -e .
	touch $@

$(STAMP_TEST): pyproject.toml constraints.txt | $(VENV)/bin/python
	$(PIP) -e '.[test,dask,stack]'
	touch $@ $(STAMP_RUN)

$(CHROMIUM):
	@if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; \
	else sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; fi

demo: install
	$(BIN)/nst demo

# Lint first (ruff: pyproject's [tool.ruff]; mypy: [tool.mypy]), then the tests.
lint: install-test
	$(BIN)/ruff check .
	$(BIN)/mypy

test: install-test lint
	$(BIN)/pytest

test-fast: install-test
	$(BIN)/pytest -m "not slow"

bench: install
	$(BIN)/python benchmarks/engine.py

# The wheels a lent GPU machine lacks (its image: Python 3.12 with PyTorch), for benchmarks/device/run.sh.
DEVICE_PLATFORMS := $(foreach p,manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64,--platform $(p))
device-wheels: $(VENV)/bin/python
	rm -rf .whl
	$(BIN)/pip download --quiet --only-binary=:all: --python-version 3.12 --implementation cp $(DEVICE_PLATFORMS) \
	  -c constraints.txt -r benchmarks/device/requirements.txt -d .whl
	@du -sh .whl

# Rewrite constraints.txt from the test environment (after changing a range in pyproject.toml).
constraints: install-test
	{ echo '# The versions the suite passed with (make constraints, from the test environment); make installs with -c.'; \
	  $(BIN)/pip freeze --exclude-editable | grep -v '^nst-bulk'; } > constraints.txt

clean:
	rm -rf $(VENV) .pytest_cache nst-demo-output test-output

# prefect.yaml (what `prefect deploy` reads) is generated from nst_cli/serve.py's one declaration.
prefect.yaml: install
	$(BIN)/nst serve --prefect-yaml > prefect.yaml

# The local stack on 127.0.0.1 (infra/stack.py): Prefect server with API auth, SeaweedFS S3 with the
# samples, a process work pool with one worker, the deployments of prefect.yaml and, with
# NST_FAILURE_WEBHOOK set, the server-side alerts (nst serve --alerts-only). Data in $(STACK_DIR)/.
STACK_DIR ?= .stack

up: $(STAMP_TEST)
	$(BIN)/python -m infra.stack up --dir $(STACK_DIR)

down:
	@if [ -x $(BIN)/python ]; then $(BIN)/python -m infra.stack down --dir $(STACK_DIR); fi

status:
	@$(BIN)/python -m infra.stack status --dir $(STACK_DIR)
