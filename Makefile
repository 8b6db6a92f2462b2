# Two entry points, each doing its own set-up on a fresh machine:
#   make demo   GRPO teaches SmolLM2-135M-Instruct addition, then evaluates base vs trained
#   make test   the test suite
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CPU wheel by default: a bare `pip install torch` pulls several GB of CUDA packages. PyTorch's
# CPU index serves torch==2.13.0 as 2.13.0+cpu, which pip prefers over PyPI's CUDA build; where
# that index cannot be reached, pip warns and takes what the other indexes (or a local wheel
# folder) have. On a GPU machine: make demo TORCH=torch TORCH_INDEX=
TORCH ?= torch==2.13.0
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
RECIPE ?= grpo_arith
PIP := $(BIN)/pip install -q --disable-pip-version-check

.PHONY: setup setup-dev demo test clean

# the demo needs the package alone; the tests add the dev extra (pytest, gymnasium, DeepSpeed)
setup: $(VENV)/.installed
setup-dev: $(VENV)/.installed-dev

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX)) "$(TORCH)"
	$(PIP) -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(PIP) -e ".[dev]"
	touch $@

demo: setup
	@set -e; t=$$SECONDS; \
	$(BIN)/rlhf model pull; echo "[demo] model ready in $$((SECONDS - t)) s" >&2; \
	run=runs/demo-$$(date +%Y%m%d-%H%M%S); t=$$SECONDS; \
	$(BIN)/rlhf train $(RECIPE) --run-dir $$run; echo "[demo] trained in $$((SECONDS - t)) s" >&2; t=$$SECONDS; \
	$(BIN)/rlhf eval $$run; echo "[demo] evaluated in $$((SECONDS - t)) s" >&2; \
	echo "[demo] the run's report (open it in a browser): $$run/report.html" >&2

test: setup-dev
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs .pytest_cache
