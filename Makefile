# Two commands do everything on a fresh machine:
#   make demo   set up .venv and run the main job (offline, CPU, embedded LiteMedSAM + shipped FoB weights)
#   make test   set up .venv and run the fast test suite
PYTHON ?= python3
VENV   := .venv
PIP    := $(VENV)/bin/pip
PY     := $(VENV)/bin/python
CONSTRAINTS ?= .ci/constraints.txt

.PHONY: setup demo test test-all benchmark screenshot clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c $(CONSTRAINTS) -e '.[test]'
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(VENV)/bin/fobsegment demo --output-dir fobsegment_demo

test: setup
	$(PY) -m pytest -q

test-all: setup
	$(PY) -m pytest -q --runslow

benchmark: setup
	$(PY) benchmarks/run_benchmark.py

screenshot: setup
	$(PY) scripts/make_screenshot.py

clean:
	rm -rf $(VENV) fobsegment_demo .pytest_cache
