# Set-up and entry points. `make test` and `make demo` create the virtual environment on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup test test-fast demo gpu-check browser-test clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,browser]'
	touch $@

setup: $(VENV)/.installed

test: $(VENV)/.installed
	$(PY) -m pytest -q

# Every module's quick tests (~2 min on two cores): all but the tiers registered in pyproject.toml's pytest markers.
FAST_TESTS := not slow and not notebooks and not browser and not distributed and not e2e
test-fast: $(VENV)/.installed
	$(PY) -m pytest -q -m "$(FAST_TESTS)"

demo: $(VENV)/.installed
	$(PY) -m cirlib.demo

# On a CUDA machine: benchmark in fp32 and bf16, training steps, feature-store build; one JSON summary (~2-4 min on an
# H100). Without CUDA: one line saying so, exit 0.
gpu-check: $(VENV)/.installed
	$(PY) -m cirlib.gpu_check

# Notebooks 07 and 08 in JupyterLab in headless Chromium, on a tiny world and runs of its own (5-6 min on two cores):
# Run All, change a widget, check the results change; screenshots in outputs/browser-test/screenshots/. Needs
# Debian's chromium and chromium-driver (`apt-get install chromium chromium-driver`); without them: one line, exit 2.
browser-test: $(VENV)/.installed
	$(PY) -m cirlib.run.browser_test

clean:
	rm -rf $(VENV) outputs/demo
