"""One cache, however sa-sft is started: the venv's script, an activated venv, a job elsewhere."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PRINT = "from sa_sft.cache import cache_dir, torch_extensions_dir; print(cache_dir()); print(torch_extensions_dir())"


def started_elsewhere(cmd: list[str], tmp_path: Path, **extra) -> list[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("SA_SFT_CACHE_DIR", "TORCH_EXTENSIONS_DIR")}
    env.update(HOME=str(tmp_path / "home"), **extra)
    out = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120, check=True)
    return out.stdout.split()


def test_checkout_cache_without_the_makefile(tmp_path):
    # What `make setup` prepared is what `.venv/bin/sa-sft` (no SA_SFT_CACHE_DIR, any directory) finds.
    assert started_elsewhere([sys.executable, "-c", PRINT], tmp_path) == [str(REPO / ".cache"),
                                                                          str(REPO / ".cache" / "torch_extensions")]


def test_the_variable_wins(tmp_path):
    got = started_elsewhere([sys.executable, "-c", PRINT], tmp_path, SA_SFT_CACHE_DIR=str(tmp_path / "c"))
    assert got == [str(tmp_path / "c"), str(tmp_path / "c" / "torch_extensions")]


def test_the_script_finds_the_prepared_model(tmp_path):
    # `sa-sft plan tiny` reads the tiny model's config.json from the cache the tests prepared.
    script = Path(sys.executable).with_name("sa-sft")
    env = {k: v for k, v in os.environ.items() if k not in ("SA_SFT_CACHE_DIR", "TORCH_EXTENSIONS_DIR")}
    if os.environ.get("SA_SFT_CACHE_DIR") and Path(os.environ["SA_SFT_CACHE_DIR"]).resolve() != REPO / ".cache":
        pytest.skip("the suite runs on another cache; the first test covers the default")
    out = subprocess.run([str(script), "prepare-model", "tiny"], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().startswith(str(REPO / ".cache")), out.stdout


def test_ops_are_built_with_the_venvs_ninja(tmp_path):
    # A system ninja (1.11) and the venv's (1.13) hash build commands differently: whichever ran last
    # makes the other rebuild every DeepSpeed op. Every trainer puts the venv's first.
    code = "from sa_sft.cache import use_own_ninja; import shutil; use_own_ninja(); print(shutil.which('ninja'))"
    got = started_elsewhere([sys.executable, "-c", code], tmp_path, PATH="/usr/bin:/bin")
    assert got == [str(Path(sys.executable).parent / "ninja")]
