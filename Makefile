# deepspec developer entry points. `make demo` and `make test` install into .venv first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of torch; on a GPU machine install the CUDA build of the same release instead.
TORCH_SPEC ?= torch==2.13.0

# Benchmark prompt files beside the repository (development and CI setup); without them the
# prompts stage downloads the benchmark sets from the Hugging Face hub.
SHARED_EVAL := $(abspath ../shared/datasets/eval)
ifneq ($(wildcard $(SHARED_EVAL)/*.jsonl),)
export DEEPSPEC_DATA_DIR ?= $(SHARED_EVAL)
endif

.PHONY: install demo test test-unit lint benchmarks clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e '.[test]'
	bash scripts/install-helm.sh $(BIN)
	touch $@

demo: install
	$(BIN)/deepspec run --config configs/demo.yaml

test: install
	$(BIN)/python -m pytest -q --durations=15

test-unit: install
	$(BIN)/python -m pytest -q tests/unit

benchmarks: install
	for script in benchmarks/*.py; do $(BIN)/python $$script || exit 1; done

clean:
	rm -rf runs .pytest_cache
