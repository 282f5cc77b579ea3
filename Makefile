# gridserve: `make demo` sets up and runs a local grid; `make test` sets up and runs the tests.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip

.PHONY: demo up test lint typecheck unit bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

TOPLOC := toploc==0.1.6
# toploc's wheel is built against another torch and fails to import: build it against the pinned torch (~3 min once)

$(VENV)/.base: pyproject.toml | $(BIN)/python
	$(PIP) install -q -e .
	$(PIP) install -q --no-build-isolation --no-binary toploc $(TOPLOC)
	touch $@

$(VENV)/.dev: pyproject.toml $(VENV)/.base
	$(PIP) install -q -e '.[dev,llamacpp]'
	touch $@

demo: $(VENV)/.base
	$(BIN)/gridserve demo --data-dir .gridserve-demo

up: $(VENV)/.base
	$(BIN)/gridserve up

lint: $(VENV)/.dev
	$(BIN)/ruff check src tests bench

typecheck: $(VENV)/.dev
	$(BIN)/mypy

test: lint typecheck
	$(BIN)/pytest -q -ra

bench: $(VENV)/.dev
	$(BIN)/python bench/gateway_overhead.py

clean:
	rm -rf $(VENV) .gridserve .gridserve-demo .pytest_cache .mypy_cache .ruff_cache
