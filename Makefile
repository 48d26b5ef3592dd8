# Set-up and entry points. `make test` and `make demo` create the virtual environment on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup test demo gpu-check clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

setup: $(VENV)/.installed

test: $(VENV)/.installed
	$(PY) -m pytest -q

demo: $(VENV)/.installed
	$(PY) -m cirlib.demo

# On a CUDA machine: benchmark in fp32 and bf16, training steps, feature-store build; one JSON summary (~2-4 min on an
# H100). Without CUDA: one line saying so, exit 0.
gpu-check: $(VENV)/.installed
	$(PY) -m cirlib.gpu_check

clean:
	rm -rf $(VENV) outputs/demo
