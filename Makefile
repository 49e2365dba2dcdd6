# diffuserve: `make serve` starts the server on the built-in model, `make test` runs the whole suite.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
BASE := $(VENV)/.base
STAMP := $(VENV)/.installed
STAMP_DEV := $(VENV)/.installed-dev
PORT ?= 8000
export PORT

.PHONY: install serve test test-fast lint format train-digits train-digits-lora eval-digits clean

# torch's CPU build comes from pip first (it lies on this machine's disk, and it keeps a CUDA build out),
# then uv installs the rest: it resolves and installs in seconds where pip takes a minute. A half-made venv
# (no pip) from an interrupted run is made again rather than reused.
$(BASE):
	@echo "diffuserve: installing into $(VENV), once (≈ 40 s): torch (CPU build) and uv, then the package"
	@test -x $(BIN)/pip || { rm -rf $(VENV) && $(PYTHON) -m venv $(VENV); }
	$(BIN)/python -m pip install -q "torch==2.13.0" "uv>=0.5"
	@touch $(BASE)

# `make serve` needs only the runtime; `make test`/`make lint` (and the digits targets) install `.[dev]`,
# which brings every extra but gpu: bench, digits, deploy. Bytecode is compiled once here (uv skips it by
# default): where Python may not write it (PYTHONDONTWRITEBYTECODE), every server and worker process would
# otherwise compile transformers and diffusers again, ≈ 3 s of a digits worker's 6 s start on 2 cores.
$(STAMP): pyproject.toml $(BASE)
	$(BIN)/uv pip install -q --compile-bytecode --python $(BIN)/python -e .
	@touch $(STAMP)

$(STAMP_DEV): pyproject.toml $(BASE)
	@echo "diffuserve: installing the test and lint tools and every extra but gpu into $(VENV)"
	$(BIN)/uv pip install -q --compile-bytecode --python $(BIN)/python -e ".[dev]"
	@touch $(STAMP) $(STAMP_DEV)

install: $(STAMP_DEV)

serve: $(STAMP)
	$(BIN)/diffuserve serve

test: $(STAMP_DEV)
	$(BIN)/python -m pytest -q -rs

test-fast: $(STAMP_DEV)
	$(BIN)/python -m pytest -q -x tests/unit

lint: $(STAMP_DEV)
	$(BIN)/ruff format --check src tests benchmarks
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/mypy
	# The layers, the API's one door into serving, and no import cycle anywhere (pyproject.toml's contracts).
	$(BIN)/lint-imports
	# Small modules: no file in src/ over 400 lines.
	@find src -name '*.py' | xargs wc -l | awk '$$2 != "total" && $$1 > 400 {print $$2 ": " $$1 " lines, over 400"; bad = 1} END {exit bad}'
	# docs/benchmarks.md's tables are what the raw outputs under docs/bench/ give.
	$(BIN)/python benchmarks/tables.py --check
	# The Dockerfile (the manifests under deploy/kubernetes/ are checked by tests/unit/test_kubernetes_manifests.py).
	$(BIN)/hadolint Dockerfile

format: $(STAMP_DEV)
	$(BIN)/ruff format src tests benchmarks
	$(BIN)/ruff check --fix src tests benchmarks

train-digits: $(STAMP_DEV)
	$(BIN)/diffuserve train-digits

# The shipped "mirror" adapter of the digits model (≈ 2 min on 2 cores; the same bytes every run).
train-digits-lora: $(STAMP_DEV)
	$(BIN)/diffuserve train-digits-lora

eval-digits: $(STAMP_DEV)
	$(BIN)/diffuserve eval digits

clean:
	rm -rf $(VENV) build dist .pytest_cache .mypy_cache .ruff_cache
