"""What the hardware can do fast; resolves `auto` precision settings.

bf16 matmuls are fast on GPUs and on CPUs with AVX512-BF16 or AMX, but on an AVX2-only
CPU PyTorch falls back to a scalar kernel that is ~100x slower than fp32 (measured:
0.3-2 GFLOP/s bf16 vs 60 GFLOP/s fp32 on one AVX2 core). So `auto` means bf16 where it is
fast and fp32 elsewhere.
"""
import functools
from pathlib import Path


@functools.lru_cache(maxsize=None)
def cpu_flags() -> frozenset:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_has_fast_bf16() -> bool:
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


def resolve_train_precision(value: str, device: str) -> str:
    if value != "auto":
        return value
    return "bf16" if device == "cuda" or cpu_has_fast_bf16() else "fp32"


def resolve_engine_dtype(value: str, device: str) -> str:
    if value != "auto":
        return value
    return "bfloat16" if device == "cuda" or cpu_has_fast_bf16() else "float32"
