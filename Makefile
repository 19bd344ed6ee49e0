# The README's two commands: `make run` (the main job) and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Ray's control plane: `make run` uses token auth (start.ray_auth); the tests set RAY_AUTH_MODE=disabled themselves.
export RAY_USAGE_STATS_ENABLED ?= 0
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install run test bench audit clean

install: $(VENV)/.installed

# A GPU box that already has a (CUDA) torch keeps it: the venv then sees the
# system packages. Elsewhere the CPU wheel is pinned, because an unpinned
# torch pulls a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml
	@if $(PYTHON) -c "import torch" 2>/dev/null; then \
		echo "using the system torch"; $(PYTHON) -m venv --system-site-packages $(VENV); \
	else \
		$(PYTHON) -m venv $(VENV); \
	fi
	$(BIN)/python -m pip install -q --upgrade pip
	@if ! $(BIN)/python -c "import torch" 2>/dev/null; then \
		$(BIN)/pip install -q torch==2.13.0; \
	fi
	$(BIN)/pip install -q -e '.[test]'
	@touch $@

run: install
	$(BIN)/banditroute up --out runs/latest

test: install
	$(BIN)/python -m pytest -q tests

bench: install
	$(BIN)/python bench/serve_bench.py --out bench/results

# Release step, not CI: needs PyPI's JSON API or OSV, which this network does not reach (docs/deploy.md).
audit:
	pip-audit -r requirements/image.lock --require-hashes --disable-pip --progress-spinner off
	pip-audit -r requirements/image-gpu.lock --require-hashes --disable-pip --progress-spinner off

clean:
	rm -rf $(VENV) runs .pytest_cache
