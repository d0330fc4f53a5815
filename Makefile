# The README's two commands: `make demo` and `make test`. Both create .venv and install
# the package with its test tools once; a second run installs nothing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# torch is pinned so that pip never resolves a bare `torch` into a multi-GB CUDA build.
# On the project's CPU machines this version lies on disk; elsewhere override it, e.g.
#   make test TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"
TORCH_SPEC ?= torch==2.13.0

.PHONY: install demo test bench clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip "setuptools>=77" wheel
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q --no-build-isolation -e ".[dev]"
	touch $(STAMP)

demo: install
	$(VENV)/bin/batchnorm demo

# The CPU kernels (see backends/cpu_compile.py) are compiled first, on every core (numba
# compiles one at a time); the tests then load them from numba's cache, in one
# pytest-xdist worker per core (PYTEST_JOBS=0: in this process).
PYTEST_JOBS ?= auto
test: install
	$(VENV)/bin/batchnorm compile
	$(PY) -m pytest -q -n $(PYTEST_JOBS)

bench: install
	$(VENV)/bin/batchnorm bench --csv

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache .hypothesis
