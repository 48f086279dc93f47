# The README's two commands: `make compare` (main job) and `make test` (the test suite).
# Each sets up its own virtual environment on first use.
PYTHON ?= python3
VENV ?= .venv
# A CPU build of torch installs from this spec on the project's machines; pass e.g.
# TORCH_SPEC="torch>=2.2" to take whatever build suits yours (CUDA included).
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.structattn-installed

.PHONY: install test compare lint bench docs wheel-check clean

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
	$(BIN)/structattn compare --out runs/compare --overwrite

lint: $(STAMP)
	$(BIN)/ruff check structattn tests benchmarks examples

bench: $(STAMP)
	$(BIN)/python benchmarks/simplex_maps.py

docs: $(STAMP)
	$(BIN)/python -m pip install --quiet -e ".[docs]"
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir runs/site

# Build the wheel and install it, without the source tree, into a fresh venv; run a smoke test.
wheel-check: $(STAMP)
	rm -rf runs/wheel && mkdir -p runs/wheel
	$(BIN)/python -m pip install --quiet build
	$(BIN)/python -m build --wheel --outdir runs/wheel/dist . >runs/wheel/build.log
	$(PYTHON) -m venv runs/wheel/venv
	runs/wheel/venv/bin/python -m pip install --quiet "$(TORCH_SPEC)"
	runs/wheel/venv/bin/python -m pip install --quiet runs/wheel/dist/*.whl
	cd runs/wheel && venv/bin/python -c "import structattn as sa, torch, sys; \
	assert 'matplotlib' not in sys.modules; \
	z = sa.CategoricalAlignment(logits=torch.randn(2, 3, 4)); \
	assert torch.allclose(z.attention.sum(-1), torch.ones(2, 3)); \
	from structattn import _native; \
	assert _native.available() or _native._compiler() is None, 'the wheel lacks the kernel source'; \
	p = sa.entmax_bisect(torch.randn(4, 30), 1.3); \
	assert torch.allclose(p.sum(-1), torch.ones(4)); \
	print('wheel', sa.__version__, 'from', sa.__file__, 'native kernel', _native.available())"

clean:
	rm -rf $(VENV) runs site .pytest_cache build
