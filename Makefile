# The two commands of the README: `make demo` (the main job) and `make test`.
PYTHON ?= python3
SHARED ?= $(abspath ../shared)
# Text to learn from (files or folders) and unseen text to evaluate on. Offline machines and CI use the
# public-domain texts in ../shared/data; point DATA/HELDOUT at any text of your own.
DATA ?= $(SHARED)/data/tinyshakespeare.txt $(addprefix $(SHARED)/data/novels/,pride_and_prejudice.txt huckleberry_finn.txt tom_sawyer.txt 12_years_a_slave.txt)
HELDOUT ?= $(SHARED)/data/novels/sherlock.txt
RUN ?= runs/demo
MINUTES ?= 4
CHAT ?= runs/chat
export PIP_ROOT_USER_ACTION ?= ignore
export TIKTOKEN_CACHE_DIR ?= $(if $(wildcard $(SHARED)/tokenizers/tiktoken_cache),$(SHARED)/tokenizers/tiktoken_cache)
# openai-harmony (the tests' Harmony oracle) reads its vocabulary files from here.
export TIKTOKEN_ENCODINGS_BASE ?= $(if $(wildcard $(SHARED)/tokenizers),$(SHARED)/tokenizers)

.PHONY: install demo chat-demo test test-fast lint bench clean

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

# Fine-tuning to chat, both ways: batches of 2 windows of 1,024 tokens (8 conversations); at most 5 minutes each.
SFT = $(PYTHON) -m ossgpt sft --checkpoint $(RUN) --data $(CHAT)/data/train.jsonl --val-data $(CHAT)/data/heldout.jsonl \
	--batch-size 2 --warmup-steps 10 --eval-every 100 --eval-batches 4 --max-minutes 5 --force

chat-demo: install  ## teach the demo's model to chat in Harmony (full and LoRA SFT on generated tasks), evaluate all three
	@test -d $(RUN)/checkpoint || $(MAKE) demo
	$(PYTHON) examples/chat_data.py --out $(CHAT)/data
	$(SFT) --out $(CHAT)/full --full --optimizer muon --learning-rate 3e-3 --max-steps 300
	$(SFT) --out $(CHAT)/lora --lora-rank 16 --lora-alpha 32 --learning-rate 3e-3 --max-steps 200
	$(PYTHON) examples/chat_eval.py base=$(RUN) full=$(CHAT)/full lora=$(CHAT)/lora --data $(CHAT)/data/heldout.jsonl \
		--json $(CHAT)/results.json

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
