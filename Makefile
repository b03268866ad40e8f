# Every target sets itself up: a virtual environment in .venv with the project installed.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
ARGS   ?=

.PHONY: install train test test-slow lint format app bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip >/dev/null
	$(BIN)/python -m pip install -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

train: $(STAMP)            ## the main job: train on the built-in dataset, then test
	$(BIN)/python train.py $(ARGS)

test: $(STAMP)             ## fast test tier (CPU, no network, a few minutes)
	$(BIN)/python -m pytest $(ARGS)

test-slow: $(STAMP)        ## end-to-end tier
	$(BIN)/python -m pytest -m slow $(ARGS)

app: $(STAMP)              ## web app on http://127.0.0.1:8000 (CKPT=x.ckpt; else the best photo-trained checkpoint under outputs/, else the newest, else trains one first)
	$(BIN)/python -m captioning.app --train-if-missing $(if $(CKPT),--ckpt $(CKPT)) $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: $(STAMP)            ## speed and memory benchmarks (CPU; GPU when there is one): outputs/bench/*.json + README.md, see docs/performance.md
	$(BIN)/python benchmarks/beam_search.py --beam 3
	$(BIN)/python benchmarks/beam_search.py --beam 5 --bf16
	$(BIN)/python benchmarks/train_step.py --bf16
	$(BIN)/python benchmarks/memory.py --size flickr8k
	$(BIN)/python benchmarks/memory.py --size flickr8k --malloc-fix
	$(BIN)/python benchmarks/memory.py --size coco
	$(BIN)/python benchmarks/gpu_train.py
	$(BIN)/python benchmarks/report.py

clean:
	rm -rf outputs .pytest_cache .ruff_cache
