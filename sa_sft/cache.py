"""The one cache: prepared models, built-in data, hashes of weights, vLLM's and DeepSpeed's compiled
artefacts. `$SA_SFT_CACHE_DIR` (the Makefile sets the checkout's `.cache/`), else ~/.cache/sa_sft."""
import os
from pathlib import Path


def cache_dir() -> Path:
    return Path(os.environ.get("SA_SFT_CACHE_DIR", Path.home() / ".cache" / "sa_sft")).resolve()


def torch_extensions_dir() -> str:
    """Where DeepSpeed JIT-compiles its ops once (`TORCH_EXTENSIONS_DIR` if set)."""
    return os.environ.get("TORCH_EXTENSIONS_DIR", str(cache_dir() / "torch_extensions"))


def vllm_cache_dir() -> str:
    return str(cache_dir() / "vllm")
