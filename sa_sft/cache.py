"""The one cache: prepared models, built-in data, hashes of weights, vLLM's and DeepSpeed's compiled
artefacts. `$SA_SFT_CACHE_DIR` if set; else, when sa-sft runs from a checkout (an editable install,
as `make setup` makes), the checkout's `.cache/`, so `make`, `.venv/bin/sa-sft`, an activated venv,
a Slurm job and a Ray job on that checkout all find the same one; else (installed from a wheel)
`$XDG_CACHE_HOME/sa_sft`, by default ~/.cache/sa_sft."""
import os
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parents[1]


def from_checkout() -> bool:
    pyproject = CHECKOUT / "pyproject.toml"
    return pyproject.is_file() and 'name = "sa-sft"' in pyproject.read_text(errors="replace")


def cache_dir() -> Path:
    if os.environ.get("SA_SFT_CACHE_DIR"):
        return Path(os.environ["SA_SFT_CACHE_DIR"]).expanduser().resolve()
    if from_checkout():
        return CHECKOUT / ".cache"
    return (Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sa_sft").resolve()


def torch_extensions_dir() -> str:
    """Where DeepSpeed JIT-compiles its ops once (`TORCH_EXTENSIONS_DIR` if set)."""
    return os.environ.get("TORCH_EXTENSIONS_DIR", str(cache_dir() / "torch_extensions"))


def vllm_cache_dir() -> str:
    return str(cache_dir() / "vllm")


def use_own_ninja() -> None:
    """Build DeepSpeed's ops with the ninja installed beside this Python (a pinned dependency), never
    another one on PATH: ninja 1.11 and 1.13 hash build commands differently, so processes that
    find different ones (a Slurm job with the venv on PATH, a test without) rebuild every op, each
    time, in the one shared build folder."""
    import sys

    here = str(Path(sys.executable).parent)
    if (Path(here) / "ninja").exists() and os.environ.get("PATH", "").split(os.pathsep)[0] != here:
        os.environ["PATH"] = here + os.pathsep + os.environ.get("PATH", "")
