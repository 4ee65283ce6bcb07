# Quick start: `make demo` runs the main job, `make test` runs the tests. Both create .venv themselves.
PYTHON ?= python3
VENV   ?= .venv
# The CPU wheel of torch; override (e.g. TORCH_SPEC="torch") on a machine with a GPU build available.
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
# DeepSpeed compiles a C++ extension on its first distributed init (tests/test_engines_distributed.py): cached here.
export TORCH_EXTENSIONS_DIR ?= $(abspath $(VENV))/torch_extensions

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	echo "$(TORCH_SPEC)" > $(VENV)/constraints.txt
	$(PY) -m pip install -q -c $(VENV)/constraints.txt -e ".[test,deepspeed]"
	touch $@

install: $(VENV)/.installed

test: install
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

test-all: install
	$(PY) -m pytest -q $(PYTEST_ARGS)

# The main job: the paper's pipeline end to end on the bundled tiny base model (no download), about 10 minutes on
# 2 CPU cores. It ends by printing the results table and where the report and plots are (runs/demo).
demo: install
	$(VENV)/bin/autodeco demo --output-dir runs/demo

bench: install
	$(PY) bench/bench_generate.py

.PHONY: install test test-all demo bench
