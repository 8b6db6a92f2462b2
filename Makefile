# Two entry points, each doing its own set-up on a fresh machine:
#   make demo   GRPO teaches SmolLM2-135M-Instruct addition, then evaluates base vs trained
#   make test   the test suite
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CPU wheel by default: a bare `pip install torch` pulls several GB of CUDA packages.
# On a GPU machine: make demo TORCH=torch
TORCH ?= torch==2.13.0
RECIPE ?= recipes/grpo_arith.yaml

.PHONY: setup demo test clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check "$(TORCH)"
	$(BIN)/pip install -q --disable-pip-version-check -e ".[dev]"
	touch $@

demo: setup
	@set -e; t=$$SECONDS; \
	$(BIN)/rlhf model pull; echo "[demo] model ready in $$((SECONDS - t)) s" >&2; \
	run=runs/demo-$$(date +%Y%m%d-%H%M%S); t=$$SECONDS; \
	$(BIN)/rlhf train $(RECIPE) --run-dir $$run; echo "[demo] trained in $$((SECONDS - t)) s" >&2; t=$$SECONDS; \
	$(BIN)/rlhf eval $$run; echo "[demo] evaluated in $$((SECONDS - t)) s" >&2

test: setup
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs .pytest_cache
