# BarkGPT: `make demo` trains the Bark preset and prints barks; `make test` runs the suite.
# Both create .venv on a fresh machine. Without a GPU the CPU build of PyTorch is installed
# first (1 GB instead of 5 GB for the CUDA build).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --quiet --disable-pip-version-check
TORCH_CPU := torch==2.13.0

.PHONY: demo test test-fast bench install install-dev clean

$(VENV)/.core: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then $(PIP) torch; else $(PIP) $(TORCH_CPU); fi
	$(PIP) -e .
	touch $@

$(VENV)/.dev: $(VENV)/.core
	$(PIP) -e '.[dev]'
	touch $@

install: $(VENV)/.core
install-dev: $(VENV)/.dev

demo: $(VENV)/.core
	$(VENV)/bin/barkgpt train --preset bark --out-dir runs/bark
	$(VENV)/bin/barkgpt sample --model runs/bark --prompt "User: speak Assistant:" --num-samples 5 --one-line --temperature 1.0 --max-new-tokens 20 --seed 0

test: $(VENV)/.dev
	$(PY) -m pytest -q

test-fast: $(VENV)/.dev
	$(PY) -m pytest -q -m "not slow"

bench: $(VENV)/.dev
	$(PY) bench/bench_train.py
	$(PY) bench/bench_decode.py
	$(PY) bench/bench_serve.py

clean:
	rm -rf runs/bark build *.egg-info
