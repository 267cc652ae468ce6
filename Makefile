# `make test` and `make bench` work on a fresh machine: they create .venv, install torch first
# (the CPU build, so pip does not pull the multi-GB CUDA one), then the package with its extras.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
TORCH   ?= torch==2.13.0
STAMP   := $(VENV)/.installed
PIP     := $(BIN)/python -m pip --disable-pip-version-check -q

.PHONY: install test test-all lint format bench reproduce smoke clean mlflow-ui

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(PIP) install $(TORCH)
	$(PIP) install -e ".[workflow,dev]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-all: $(STAMP)
	$(BIN)/python -m pytest -q -m ''

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: $(STAMP)
	$(BIN)/python -m moe_impl bench --out results/bench

# the MLflow UI on http://127.0.0.1:5000 for results/mlflow.db (tracking ui --help for options)
mlflow-ui: $(STAMP)
	$(BIN)/python -m moe_impl tracking ui

# the default reproduction (Snakefile + config/config.yaml), then its HTML report
reproduce: $(STAMP)
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/snakemake --cores all
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/snakemake --report results/report.html

# every step of the reproduction at toy size (config/smoke.yaml), in a few minutes
smoke: $(STAMP)
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/snakemake --cores all --configfile config/smoke.yaml

clean:
	rm -rf results/bench .pytest_cache
