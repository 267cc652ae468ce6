# `make test` and `make bench` work on a fresh machine: they create .venv, install torch first
# (the CPU build, so pip does not pull the multi-GB CUDA one), then the package with its extras.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
TORCH   ?= torch==2.13.0
STAMP   := $(VENV)/.installed
PIP     := $(BIN)/python -m pip --disable-pip-version-check -q

.PHONY: install test test-integration test-slow test-all lint format bench reproduce smoke clean mlflow-ui \
	gpu-check

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(PIP) install $(TORCH)
	$(PIP) install -e ".[workflow,dev,peers]"
	touch $(STAMP)

install: $(STAMP)

# Test tiers (markers in pyproject.toml, described in tests/conftest.py): `test` is the unit tier
# (about a minute on 2 cores), `test-integration` and `test-slow` the others, `test-all` every tier.
PYTEST  := $(BIN)/python -m pytest -q $(PYTEST_ARGS)

test: $(STAMP)
	$(PYTEST) -m 'not integration and not slow'

test-integration: $(STAMP)
	$(PYTEST) -m 'integration and not slow'

test-slow: $(STAMP)
	$(PYTEST) -m slow

test-all: $(STAMP)
	$(PYTEST) -m ''

# mypy's settings (packages moe_impl and analysis, strictness) are in pyproject.toml's [tool.mypy]
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/snakefmt --check Snakefile workflow
	$(BIN)/snakemake --lint --configfile config/smoke.yaml

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: $(STAMP)
	$(BIN)/python -m moe_impl bench --out results/bench

# One GPU, under 8 minutes: exactness on the device, kernels, 131072 experts, speed against the
# dense FFN and Table 7, the trainer with NVML, NCCL, and config/gpu.yaml's projected time
# (docs/gpu.md). It runs with the machine's own python3 and its CUDA torch, not .venv's CPU build.
GPU_CHECK_OUT ?= results/gpu_check
gpu-check:
	PYTHONUNBUFFERED=1 $(PY) -m moe_impl gpu-check --device cuda --out $(GPU_CHECK_OUT)

# the MLflow UI on http://127.0.0.1:5000 for results/mlflow.db (tracking ui --help for options)
mlflow-ui: $(STAMP)
	$(BIN)/python -m moe_impl tracking ui

# the memory budget Snakemake holds the jobs it runs together to: this machine's free memory now
# less a reserve (workflow/scripts/mem_budget.py); `make reproduce MEM_MB=12000` sets it by hand
MEM_MB  ?= $$($(BIN)/python workflow/scripts/mem_budget.py)

# the default reproduction (Snakefile + config/config.yaml), then its HTML report; `make reproduce
# CONFIG=config/gpu.yaml` runs another workflow config
CONFIG  ?=
CONFIGFILE = $(if $(CONFIG),--configfile $(CONFIG))
# a CONFIG that is not a file stops here, in one line, before any install or Snakemake traceback
ifneq ($(filter reproduce,$(MAKECMDGOALS)),)
ifneq ($(CONFIG),)
ifeq ($(wildcard $(CONFIG)),)
$(error CONFIG=$(CONFIG): no such file; the workflow configs are config/config.yaml, config/smoke.yaml, config/gpu.yaml, config/paper.yaml or one of your own)
endif
endif
endif
reproduce: $(STAMP)
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/snakemake --cores all --resources mem_mb=$(MEM_MB) $(CONFIGFILE)
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/snakemake --report results/report.html $(CONFIGFILE)

# every step of the reproduction at toy size (config/smoke.yaml), in a few minutes
smoke: $(STAMP)
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/snakemake --cores all --resources mem_mb=$(MEM_MB) \
		--configfile config/smoke.yaml

clean:
	rm -rf results/bench .pytest_cache
