# Quick start: `make demo` runs the main job, `make test` runs the tests. Both create .venv themselves.
PYTHON ?= python3
VENV   ?= .venv
# The CPU wheel of torch; override (e.g. TORCH_SPEC="torch") on a machine with a GPU build available.
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	echo "$(TORCH_SPEC)" > $(VENV)/constraints.txt
	$(PY) -m pip install -q -c $(VENV)/constraints.txt -e ".[test]"
	touch $@

install: $(VENV)/.installed

test: install
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

test-all: install
	$(PY) -m pytest -q $(PYTEST_ARGS)

# Until `autodeco demo` exists (it needs training and evaluation), the main job wraps a tiny random local base
# with fresh heads and decodes with them, showing every token's T and P. No download.
demo: install
	$(PY) -m autodeco.testing runs/tiny-base
	$(VENV)/bin/autodeco init --base runs/tiny-base --output-dir runs/tiny-autodeco
	$(VENV)/bin/autodeco generate --model runs/tiny-autodeco --prompt "The answer is" --max-new-tokens 24 --seed 0 --show-trace

bench: install
	$(PY) bench/bench_generate.py

.PHONY: install test test-all demo bench
