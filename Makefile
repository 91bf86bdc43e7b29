# The two commands of the README: `make demo` (the main job) and `make test`.
PYTHON ?= python3
SHARED ?= $(abspath ../shared)
# Text to learn from (files or folders) and unseen text to evaluate on. Offline machines and CI use the
# public-domain texts in ../shared/data; point DATA/HELDOUT at any text of your own.
DATA ?= $(SHARED)/data/tinyshakespeare.txt $(addprefix $(SHARED)/data/novels/,pride_and_prejudice.txt huckleberry_finn.txt tom_sawyer.txt 12_years_a_slave.txt)
HELDOUT ?= $(SHARED)/data/novels/sherlock.txt
RUN ?= runs/demo
MINUTES ?= 4
export PIP_ROOT_USER_ACTION ?= ignore
export TIKTOKEN_CACHE_DIR ?= $(if $(wildcard $(SHARED)/tokenizers/tiktoken_cache),$(SHARED)/tokenizers/tiktoken_cache)
# openai-harmony (the tests' Harmony oracle) reads its vocabulary files from here.
export TIKTOKEN_ENCODINGS_BASE ?= $(if $(wildcard $(SHARED)/tokenizers),$(SHARED)/tokenizers)

.PHONY: install demo test test-fast lint bench clean

install:  ## torch first (the CPU wheel; an unpinned torch pulls gigabytes of CUDA), then this checkout + dev tools
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install -q torch==2.13.0
	@$(PYTHON) -c "import tiktoken, safetensors, numpy, tqdm, matplotlib, ninja, pytest, hypothesis, transformers, ruff, fastapi, uvicorn, openai_harmony, openai, httpx, selenium" 2>/dev/null \
		|| $(PYTHON) -m pip install -q -e ".[dev]"
	@# Point the `ossgpt` package at this checkout; offline too (no build isolation: setuptools is already here).
	@$(PYTHON) -m pip install -q --no-deps --no-build-isolation -e .

demo: install  ## prepare a small corpus, train the tiny preset for a few CPU minutes, evaluate, generate
	@# The command line's defaults are the tiny preset's recipe: its tokenizer, model and training settings.
	$(PYTHON) -m ossgpt prepare $(DATA) --out $(RUN)/data --force
	$(PYTHON) -m ossgpt train --data $(RUN)/data --out $(RUN) --preset tiny --max-minutes $(MINUTES) --force
	$(PYTHON) -m ossgpt eval --checkpoint $(RUN) $(HELDOUT) --train-data $(RUN)/data --plot $(RUN)/plots
	$(PYTHON) -m ossgpt generate --checkpoint $(RUN) --prompt "It was a dark and stormy night" --max-new-tokens 80 --seed 0

test: install  ## the whole suite, CPU only (a few minutes)
	$(PYTHON) -m pytest -q

test-fast: install
	$(PYTHON) -m pytest -q -m "not slow"

lint:
	$(PYTHON) -m ruff check src tests bench examples main.py prep_corpus.py
	$(PYTHON) -m ruff format --check src tests bench examples main.py prep_corpus.py

bench: install
	$(PYTHON) bench/run.py

clean:
	rm -rf runs .pytest_cache build *.egg-info
