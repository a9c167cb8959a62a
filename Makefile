# BarkGPT: `make demo` trains the Bark preset and prints barks; `make test` runs the suite.
# Both create .venv on a fresh machine. Without a GPU the CPU build of PyTorch is installed
# first (1 GB instead of 5 GB for the CUDA build).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --quiet --disable-pip-version-check
TORCH_CPU := torch==2.13.0
LLAMA_CPP := llama-cpp-python==0.3.36

.PHONY: demo test test-fast lint format bench install install-dev clean docker

$(VENV)/.core: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then $(PIP) torch; else $(PIP) $(TORCH_CPU); fi
	$(PIP) -e .
	touch $@

$(VENV)/.dev: $(VENV)/.core
	$(PIP) -e '.[dev]'
	touch $@

# llama.cpp for the GGUF parity tests: pip compiles it from source for this CPU once (9-18 min on
# 2 cores) and keeps the wheel in its cache, so later venvs reuse it. A failed build only makes
# those tests skip, with the reason.
$(VENV)/.llama: $(VENV)/.dev
	@echo "installing $(LLAMA_CPP) (the first time, pip compiles llama.cpp: 9-18 min on 2 cores)"
	$(PIP) '$(LLAMA_CPP)' || echo "warning: $(LLAMA_CPP) did not install; the llama.cpp parity tests will skip"
	touch $@

# Debian's Chromium for the browser tests (tests/integration/test_web.py drives it with the
# playwright package; `playwright install` would download a browser, which cannot work offline).
# Without root, apt or a network, those tests skip with the reason instead.
$(VENV)/.chromium: $(VENV)/.dev
	if [ ! -x /usr/bin/chromium ]; then \
	  if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) || echo "warning: chromium did not install; the browser tests will skip"; \
	  else echo "warning: no apt-get or not root: install chromium (apt-get install chromium) or the browser tests will skip"; fi; \
	fi
	touch $@

install: $(VENV)/.core
install-dev: $(VENV)/.dev

demo: $(VENV)/.core
	$(VENV)/bin/barkgpt train --preset bark --out-dir runs/bark
	$(VENV)/bin/barkgpt sample --model runs/bark --prompt "User: speak Assistant:" --num-samples 5 --one-line --temperature 1.0 --max-new-tokens 20 --seed 0

test: $(VENV)/.dev $(VENV)/.llama $(VENV)/.chromium lint
	$(PY) -m pytest -q

# ruff keeps the style (its settings are in pyproject.toml); `make format` applies it
lint: $(VENV)/.dev
	$(PY) -m ruff check barkgpt tests bench
	$(PY) -m ruff format --check barkgpt tests bench

format: $(VENV)/.dev
	$(PY) -m ruff check --fix barkgpt tests bench
	$(PY) -m ruff format barkgpt tests bench

test-fast: $(VENV)/.dev
	$(PY) -m pytest -q -m "not slow"

bench: $(VENV)/.dev $(VENV)/.llama
	$(PY) bench/bench_train.py --budget 180
	$(PY) bench/bench_numpy.py
	$(PY) bench/bench_attention.py
	$(PY) bench/bench_gelu.py
	$(PY) bench/bench_decode.py
	$(PY) bench/bench_serve.py
	$(PY) bench/bench_gpu.py --if-gpu

# The CPU image barkgpt:latest (Dockerfile; the README's Deploy section). BASE_IMAGE=... builds
# on another base (a Python 3.11+ image with venv). WHEELHOUSE=docker/wheelhouse (a folder inside
# the repo, the build context) builds offline: docker/wheelhouse.sh makes the wheels there with
# this machine's pip (its Python must match the image's), and the image installs only from them.
BASE_IMAGE ?=
WHEELHOUSE ?=
docker:
	$(if $(WHEELHOUSE),PYTHON=$(if $(wildcard $(PY)),$(PY),$(PYTHON)) docker/wheelhouse.sh $(WHEELHOUSE))
	docker build -t barkgpt:latest --build-arg TORCH=$(TORCH_CPU) $(if $(BASE_IMAGE),--build-arg BASE_IMAGE=$(BASE_IMAGE)) $(if $(WHEELHOUSE),--build-arg WHEELHOUSE=$(WHEELHOUSE)) .

clean:
	rm -rf runs/bark build *.egg-info
