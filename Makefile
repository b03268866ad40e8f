# Every target sets itself up: a virtual environment in .venv with the project installed.
# ARGS passes overrides to the command behind a target: make train ARGS="debug=fast".
# Outside make, `source .venv/bin/activate` once, then run `python train.py ...` (see README.md).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
ARGS   ?=

.PHONY: help install train test test-slow lint format app bench bench-docs gpu gpu-dry-run gpu-wheels clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip >/dev/null
	$(BIN)/python -m pip install -e ".[dev]"
	touch $(STAMP)

help:                      ## this list
	@echo 'make <target> [ARGS="overrides"]   e.g. make train ARGS="debug=fast", make test ARGS="-x tests/test_vocab.py"'
	@awk -F ':.*## ' '/^[a-z-]+:.*## / {printf "  %-10s %s\n", $$1, $$2}' $(MAKEFILE_LIST)
	@echo 'Other commands (python train.py, evaluate.py, caption.py): source $(VENV)/bin/activate first.'

install: $(STAMP)          ## create .venv and install the project (every target does this first)

train: $(STAMP)            ## train on the built-in dataset, then test (about 4 min on 2 cores)
	$(BIN)/python train.py $(ARGS)

test: $(STAMP)             ## fast test tier (CPU, no network, a few minutes)
	$(BIN)/python -m pytest $(ARGS)

test-slow: $(STAMP)        ## end-to-end tier
	$(BIN)/python -m pytest -m slow $(ARGS)

app: $(STAMP)              ## web app on http://127.0.0.1:8000 (CKPT=x.ckpt; else the best photo-trained checkpoint under outputs/, else the newest, else trains one first)
	$(BIN)/python -m captioning.app --train-if-missing $(if $(CKPT),--ckpt $(CKPT)) $(ARGS)

lint: $(STAMP)             ## ruff check + format check
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)           ## ruff fix + format
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# make bench [CKPT=x.ckpt] [CAPTIONING_CACHE=dir]: every number of docs/performance.md, measured
# on this machine. Without CKPT the decoder is random (of the flickr8k experiment's size); without
# a Flickr8k feature cache under CAPTIONING_CACHE (default outputs/cache) the features are random.
# The outputs say which. make bench-docs then writes the tables into docs/performance.md.
bench: $(STAMP)            ## speed and memory benchmarks (CPU; GPU when there is one): outputs/bench/*.json + README.md
	$(BIN)/python benchmarks/roofline.py --threads 1,2
	BENCH_CKPT=$(CKPT) $(BIN)/python benchmarks/beam_search.py --beams 3,5 --threads 1,2
	$(BIN)/python benchmarks/train_step.py --bf16 --curve 200
	$(BIN)/python benchmarks/train_step.py --decoder updown --name train_step_updown
	$(BIN)/python benchmarks/scst_step.py
	$(BIN)/python benchmarks/memory.py --size flickr8k
	$(BIN)/python benchmarks/memory.py --size flickr8k --malloc-fix
	$(BIN)/python benchmarks/memory.py --size coco
	$(if $(CKPT),$(BIN)/python benchmarks/app_latency.py --ckpt $(CKPT) --mode concurrency,@echo "app_latency: not run (it serves a trained model: CKPT=x.ckpt)")
	$(BIN)/python benchmarks/gpu_train.py
	$(BIN)/python benchmarks/report.py

# A lent GPU machine has no network, so no .venv: there python3 with the carried wheels runs it
# (docs/performance.md, "GPU").
GPU_PYTHON ?= $(if $(wildcard $(BIN)/python),$(BIN)/python,python3)

gpu:                       ## CUDA test tier + GPU benchmarks, ~5 min (docs/performance.md, "GPU"); no CUDA: skipped
	$(GPU_PYTHON) benchmarks/gpu_check.py $(ARGS)

gpu-dry-run:               ## the same script on the CPU at small sizes: checks its code, times nothing
	$(GPU_PYTHON) benchmarks/gpu_check.py --device cpu --quick $(ARGS)

gpu-wheels:                ## wheels of what a bare GPU machine lacks, into .whl/ (needs PyPI)
	benchmarks/gpu_wheels.sh

bench-docs: $(STAMP)       ## the tables of docs/performance.md from outputs/bench/*.json
	$(BIN)/python benchmarks/report.py --docs docs/performance.md

clean:
	rm -rf outputs .pytest_cache .ruff_cache
