# Quick start: `make demo` runs the demo consortium, `make test` runs the tests.
# Both create the virtual environment on first use (CPU torch from the local wheel
# cache when present; any torch>=2.11 works on a GPU host).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export FLWR_TELEMETRY_ENABLED := 0
export FLWR_DISABLE_UPDATE_CHECK := 1
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: demo test test-fast lint venv embedded-model

$(BIN)/fedsynth-site: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

venv: $(BIN)/fedsynth-site

demo: venv
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/fedsynth-coordinator demo

test: venv
	$(BIN)/python -m pytest -m "not gpu"

test-fast: venv
	$(BIN)/python -m pytest

lint: venv
	$(BIN)/ruff check .

# Rebuild the shipped embedded model (client/embedded_model/) from client/pretrain.py's RECIPE,
# seed 0: ~19 minutes on one core. Needed after changing RECIPE (a test says so); commit the folder.
embedded-model: venv
	$(BIN)/python -m client.embedded_regenerate
