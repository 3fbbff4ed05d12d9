# Two entry points: `make demo` (set-up + quickstart) and `make test` (set-up +
# Redis + the whole suite). Everything the project needs is installed here.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.sieve-installed
# The gpu extra in its own venv (it replaces faiss-cpu and onnxruntime), no torch.
VENV_GPU := .venv-gpu
GPU_STAMP := $(VENV_GPU)/.sieve-installed
GPU_WORK := .gpu-extra
# Real MovieLens when it sits beside the checkout; otherwise quickstart downloads
# it (and falls back to a seeded synthetic catalog when offline).
SHARED_ML := ../shared/data/movielens/ml-latest-small
DATA ?= $(if $(wildcard $(SHARED_ML)/ratings.csv),$(SHARED_ML),)

.PHONY: demo test venv venv-gpu test-gpu-extra redis prometheus protos lint clean

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The CPU wheel of torch first: a range that admits newer versions pulls CUDA.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e '.[cpu,offline,dev,bench,locust,tracing]'
	touch $@

venv-gpu: $(GPU_STAMP)

$(GPU_STAMP): pyproject.toml constraints.txt constraints-gpu.txt
	$(PYTHON) -m venv $(VENV_GPU)
	$(VENV_GPU)/bin/python -m pip install -q --upgrade pip
	$(VENV_GPU)/bin/python -m pip install -q -c constraints.txt -c constraints-gpu.txt \
	  -e '.[gpu,dev,bench]'
	touch $@

# The gpu extra on this host, GPU or not: a set built by the cpu extra loads, both
# services start and say where they run, benchmarks.gpu runs (tests/gpu_extra).
test-gpu-extra: $(STAMP) $(GPU_STAMP)
	rm -rf $(GPU_WORK) && mkdir -p $(GPU_WORK)
	$(VENV)/bin/sieve build --synthetic 3000 --out $(GPU_WORK)/artifacts >$(GPU_WORK)/build.log
	SIEVE_GPU_EXTRA_ARTIFACTS=$(GPU_WORK)/artifacts $(VENV_GPU)/bin/python -m pytest \
	  --noconftest -p no:cacheprovider tests/gpu_extra $(PYTEST_ARGS)

# Debian's redis-server, for the tests; the fixture starts it on a free port.
redis:
	@command -v redis-server >/dev/null || { \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq redis-server >/dev/null; }
	@redis-server --version

# Debian's prometheus (with promtool), for the metrics tests; never started as a service.
prometheus:
	@command -v prometheus >/dev/null && command -v promtool >/dev/null || { \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq \
	    --no-install-recommends prometheus >/dev/null; }
	@prometheus --version 2>&1 | head -1

demo: $(STAMP)
	$(VENV)/bin/sieve quickstart $(if $(DATA),--data $(DATA),)

test: $(STAMP) redis prometheus
	$(PY) -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/lint-imports
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy app candidate ranker features sieve benchmarks

protos: $(STAMP)
	$(PY) -m sieve.protogen

clean:
	rm -rf $(VENV) $(VENV_GPU) $(GPU_WORK) artifacts .pytest_cache
