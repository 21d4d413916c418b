# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv when it is missing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# 8 fake CPU devices; generous collective timeouts so a loaded 2-core host never aborts a step.
export XLA_FLAGS ?= --xla_force_host_platform_device_count=8 --xla_cpu_collective_call_terminate_timeout_seconds=1800 --xla_cpu_collective_timeout_seconds=1800
export JAX_PLATFORMS ?= cpu
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install demo study-demo test chromium bench lint clean

install: $(STAMP)

# The TPU and GPU compilers for `mixlm plan --compile-for v5p-32 | h100-8` and tests/test_compile_{tpu,gpu}.py:
# libtpu (what jax[tpu]==0.10.2 pins; 684 MB) and the CUDA PJRT plugin alone (132 MB download, 402 MB
# installed; jax[cuda13]'s 3 GB of NVIDIA runtime wheels are not needed to compile). Each in its own folder
# off the import path: JAX starts every plugin it finds, and on a CPU host an importable libtpu prints TPU
# warnings and the CUDA plugin a traceback (mixlm.compiled.targets loads them only to compile).
TPU_COMPILER := libtpu==0.0.42.*
GPU_COMPILER := jax-cuda13-plugin==0.10.2 jax-cuda13-pjrt==0.10.2

# torch first, pinned, so nothing below pulls a multi-GB CUDA build of it.
$(STAMP): requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -r requirements.txt
	$(BIN)/pip install -q --no-deps --upgrade --target $(VENV)/tpu-compiler '$(TPU_COMPILER)'
	$(BIN)/pip install -q --no-deps --upgrade --target $(VENV)/gpu-compiler $(GPU_COMPILER)
	$(BIN)/pip install -q --no-deps -e .
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m mixlm.demo --out runs/demo

# A whole mixture study on the demo corpus (configs/studies/demo.yaml): search rounds, transfer, validation,
# report in runs/study-demo/report/. A rerun resumes; docs/studies.md has its wall time on 2 CPU cores.
study-demo: $(STAMP)
	$(BIN)/python -m mixlm.cli study run configs/studies/demo.yaml

# tests/test_study.py renders the study report in headless chromium (Debian's package).
chromium:
	@command -v chromium >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq chromium; } || \
	  { echo "make test: tests/test_study.py needs chromium: apt-get install -y chromium" >&2; exit 1; }

# Test files on TEST_WORKERS processes (pytest-xdist; each file whole on one worker, so module fixtures are built
# once), the slowest files first (tests/conftest.py orders them). TEST_WORKERS=0 runs them in this process.
# The processes share one JAX compilation cache, fresh for each run (tests/conftest.py).
TEST_WORKERS ?= 2
test: $(STAMP) chromium
	$(BIN)/python -m pytest tests -n $(TEST_WORKERS) --dist loadfile

bench: $(STAMP)
	$(BIN)/python benchmarks/train_throughput.py

lint: $(STAMP)
	$(BIN)/python -m ruff check mixlm tests benchmarks launch

clean:
	rm -rf runs .pytest_cache
