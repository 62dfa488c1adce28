# One command sets everything up and runs the main job; one sets up and runs the tests.
#   make demo    # venv + torch 2.13.0 (CPU) + qdistill + Fashion-MNIST, then `qdistill demo`
#   make test    # the same setup, then the whole test suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
OUT    ?= runs/demo
DEMO_ARGS ?=

.PHONY: setup data demo demo-quick test lint clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch is pinned here, not in the package: 2.13.0 is the CPU wheel this machine carries.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	touch $@

data:
	bash scripts/ensure-data.sh

demo: setup data
	$(BIN)/qdistill demo --out $(OUT) $(DEMO_ARGS)

demo-quick: setup data
	$(BIN)/qdistill demo --quick --out runs/demo-quick

test: setup data
	$(BIN)/ruff check qdistill tests benchmarks
	$(BIN)/pytest

clean:
	rm -rf $(VENV) runs .pytest_cache
