# Two commands matter: `make demo` (set up, run the classic experiment) and `make test`.
# Setup is idempotent: the venv is rebuilt only when pyproject.toml changes.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
PYTEST_ARGS ?=
# The torch requirement, overridable: `make setup TORCH="torch==2.13.0"` (default), TORCH_INDEX_URL
# picks the wheel index: https://download.pytorch.org/whl/cpu (CPU-only, small) or .../whl/cu126 (CUDA).
# Empty TORCH_INDEX_URL: PyPI, whose Linux x86-64 torch wheel is the CUDA build (gigabytes).
TORCH ?= torch==2.13.0
TORCH_INDEX_URL ?=

.PHONY: setup data browser demo demo-quick test test-fast bench lint wheel docs clean

setup: $(STAMP) data browser

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, as TORCH / TORCH_INDEX_URL say (see the top of this file and the README)
	$(PY) -m pip install -q "$(TORCH)" $(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL))
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

data: $(STAMP)
	bash scripts/install-data.sh $(PY)

# Headless Chromium for the browser tests of review.html and report.html (apt-get where it exists).
browser:
	bash scripts/install-browser.sh

demo: setup
	$(VENV)/bin/ttakit demo --out runs/demo

demo-quick: setup
	$(VENV)/bin/ttakit demo --quick --out runs/demo-quick

# CI=true: `setup` installed Fashion-MNIST, so a test that would skip for want of it fails instead.
test: setup
	CI=$${CI:-true} $(PY) -m pytest $(PYTEST_ARGS)

test-fast: setup
	CI=$${CI:-true} $(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

bench: setup
	$(PY) benchmarks/engine.py
	$(PY) benchmarks/search.py

# Many more fuzz cases than the suite runs (malformed policy JSON, checkpoint metadata and weights,
# image bytes), with fresh randomness each run: about 100k cases, several minutes on 2 cores.
.PHONY: fuzz
fuzz: setup
	TTAKIT_FUZZ_PROFILE=fuzz-deep $(PY) -m pytest -q tests/test_fuzz.py $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/lint-imports

# The wheel and the sdist, into dist/. `python -m build` builds in an isolated environment (it
# fetches setuptools>=77 from the index); BUILD_ARGS=--no-isolation uses the venv's setuptools.
BUILD_ARGS ?=
wheel: $(STAMP)
	rm -rf dist
	$(PY) -m build $(BUILD_ARGS) --outdir dist .

# The documentation site (MkDocs Material + mkdocstrings), into site/: open site/index.html, or
# run `$(VENV)/bin/mkdocs serve` for http://127.0.0.1:8000. --strict: a broken link or docstring fails.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

clean:
	rm -rf $(VENV) build dist site src/*.egg-info .pytest_cache .hypothesis .ruff_cache
