# The README's two commands: `make compare` (main job) and `make test` (the test suite).
# Each sets up its own virtual environment on first use.
PYTHON ?= python3
VENV ?= .venv
# A CPU build of torch installs from this spec on the project's machines; pass e.g.
# TORCH_SPEC="torch>=2.2" to take whatever build suits yours (CUDA included).
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.structattn-installed

.PHONY: install test compare lint bench docs clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q --timeout=900

compare: $(STAMP)
	$(BIN)/structattn compare --out runs/compare

lint: $(STAMP)
	$(BIN)/ruff check structattn tests benchmarks examples

bench: $(STAMP)
	$(BIN)/python benchmarks/simplex_maps.py

docs: $(STAMP)
	$(BIN)/python -m pip install --quiet -e ".[docs]"
	$(BIN)/mkdocs build --strict

clean:
	rm -rf $(VENV) runs site .pytest_cache
