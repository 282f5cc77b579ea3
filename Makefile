# gridserve: `make demo` sets up and runs a local grid; `make test` sets up and runs the tests.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip

.PHONY: demo up test lint typecheck unit bench clean

# Cache bytecode even where the environment says not to: pytest rewrites the asserts of ~370 modules (the tests' and
# its plugins') in each worker, and every gateway or node a grid test starts compiles gridserve, on every run
# otherwise (collecting tests/unit took 25 s instead of 14 s, measured).
unexport PYTHONDONTWRITEBYTECODE

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

TOPLOC := toploc==0.1.6
# toploc's wheel is built against another torch and fails to import: build it against the pinned torch (~3 min once)

$(VENV)/.base: pyproject.toml | $(BIN)/python
	$(PIP) install -q -e '.[all]'
	$(PIP) install -q --no-build-isolation --no-binary toploc $(TOPLOC)
	touch $@

LLAMACPP := llama-cpp-python[server]==0.3.36
# llama.cpp's default build targets the build machine's CPU (-march=native): AMX and AVX-512 where it has them,
# which fault under some hypervisors (a general protection fault in libggml-cpu on the first decode). Build for
# AVX2, without pip's wheel cache: the cache ignores CMAKE_ARGS and would hand back a native wheel built earlier.
# Without the multimodal library (mtmd: imported only by vision chat handlers, which gridserve does not use).
LLAMACPP_CMAKE := -DLLAVA_BUILD=OFF -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON

# The dashboard test drives Debian's Chromium with playwright (no browser download): install it when missing.
CHROMIUM := /usr/bin/chromium

$(CHROMIUM):
	@command -v apt-get >/dev/null || { echo "the dashboard test needs Chromium at $(CHROMIUM)"; exit 1; }
	SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get install -y -q chromium >/dev/null 2>&1 || { $$SUDO apt-get update -q >/dev/null && $$SUDO apt-get install -y -q chromium >/dev/null; }

$(VENV)/.dev: pyproject.toml $(VENV)/.base | $(CHROMIUM)
	$(PIP) install -q -e '.[dev]'
	CMAKE_ARGS="$(LLAMACPP_CMAKE)" $(PIP) install -q --no-cache-dir '$(LLAMACPP)'
	touch $@

demo: $(VENV)/.base
	$(BIN)/gridserve demo --data-dir .gridserve-demo

up: $(VENV)/.base
	$(BIN)/gridserve up

lint: $(VENV)/.dev
	$(BIN)/ruff check src tests bench

typecheck: $(VENV)/.dev
	$(BIN)/mypy

# Two workers, a test file each at a time (module fixtures stay in one process): the suite waits on processes and
# sockets as much as it computes. Then the tests marked serial, alone: they compare a real grid's timings with a
# model of them, and another worker's grid beside them on 2 cores slowed their nodes threefold (a real TPOT of
# 0.165 s against 0.037 s simulated). Both phases run; either failing fails the target.
test: lint typecheck
	status=0; \
	  $(BIN)/pytest -q -ra -n 2 --dist loadfile -m "not serial" || status=$$?; \
	  $(BIN)/pytest -q -ra -p no:xdist -m serial || status=$$?; \
	  exit $$status

# Unit tests only: no processes, no sockets (tests/unit/), in two workers, a test file each at a time: a module's
# fixtures (a loaded engine, a built model) are then made in one worker, not both (51.2-54.4 s against 54.9-56.7 s
# with tests spread one by one, three runs each, alternating).
unit: $(VENV)/.dev
	$(BIN)/pytest -q -ra -n 2 --dist loadfile tests/unit

bench: $(VENV)/.dev
	$(BIN)/python bench/gateway_overhead.py

clean:
	rm -rf $(VENV) .gridserve .gridserve-demo .pytest_cache .mypy_cache .ruff_cache
