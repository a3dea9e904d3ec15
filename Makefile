# One-command entry points. Everything installs into ./.venv through constraints.txt, which pins the CPU torch
# wheel so pip can never pull a CUDA build on a CPU machine. GPU users: see README ("Install on a GPU machine").
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
PIP     := $(BIN)/pip install -q -c constraints.txt
export TRITON_INTERPRET ?= 1

.PHONY: test demo lint setup setup-dev clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

$(VENV)/.setup: requirements.txt constraints.txt setup.py | $(BIN)/python
	$(PIP) -r requirements.txt
	$(PIP) --no-deps -e .
	touch $@

$(VENV)/.setup-dev: $(VENV)/.setup requirements-dev.txt
	$(PIP) -r requirements-dev.txt
	$(BIN)/pip install -q --no-deps open_clip_torch==3.3.0  # dev only: independent tokenizer oracle
	touch $@

setup: $(VENV)/.setup
setup-dev: $(VENV)/.setup-dev

## Set up and run the whole test suite (CPU; Triton kernels under the interpreter).
test: $(VENV)/.setup-dev
	$(BIN)/python -m pytest -q

## Lint (ruff.toml: pyflakes, pycodestyle, import order) and check that the code is ruff-formatted.
lint: $(VENV)/.setup-dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

## Set up and run the embedded default: train a small GroupViT on generated shapes, then segment zero-shot.
demo: $(VENV)/.setup
	$(BIN)/python -m train.demo

clean:
	rm -rf $(VENV) runs .pytest_cache
