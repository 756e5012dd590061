"""`pip install .` gives a working `sa-sft` outside the checkout: the wheel ships the built-in configs,
the DeepSpeed presets, the Slurm scripts and the built-in data, and its command runs from any directory.
`sa-sft slurm-scripts DIR` copies the scripts out and refuses to clobber an edited copy."""
import json
import os
import shutil
import stat
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from pathlib import Path

import pytest

from sa_sft.cli import main
from sa_sft.cluster.slurm import SCRIPTS_DIR

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "sa_sft"
VERSION = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
SCRIPTS = ["evaluate.sbatch", "generate.sbatch", "sa_sft.sbatch", "submit_chain.sh", "train.sbatch"]


def shipped_files() -> set[str]:
    """Every file of the package tree in the checkout, as a wheel names it: code and data alike."""
    return {p.relative_to(REPO).as_posix() for p in PACKAGE.rglob("*")
            if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"}


def run(cmd, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=120, **kwargs)


def test_the_wheel_installs_and_runs_outside_the_checkout(tmp_path, tiny_model):
    # Built from a copy of the tree: an in-tree build writes build/ and sa_sft.egg-info/ into the
    # checkout, under the feet of whoever else builds or runs there.
    src, wheels, venv, elsewhere = tmp_path / "src", tmp_path / "wheels", tmp_path / "venv", tmp_path / "elsewhere"
    shutil.copytree(REPO, src, symlinks=True, ignore=shutil.ignore_patterns(
        ".git", ".venv", ".cache", "runs", "build", "__pycache__", "*.egg-info", ".pytest_cache", ".import_linter_cache"))
    built = run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
                 "-w", wheels, src])
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    (wheel,) = wheels.glob("sa_sft-*.whl")
    assert wheel.name.startswith(f"sa_sft-{VERSION}-")
    names = set(zipfile.ZipFile(wheel).namelist())
    for folder, pattern in [("configs", "*.yaml"), ("ds_configs", "*.json"), ("slurm", "*"), ("data/builtin", "*")]:
        assert list((PACKAGE / folder).glob(pattern)), folder  # the checks below would pass vacuously
    assert {"sa_sft/configs/tiny.yaml", "sa_sft/ds_configs/zero3.json", "sa_sft/slurm/sa_sft.sbatch",
            "sa_sft/slurm/submit_chain.sh", "sa_sft/data/builtin/gsm_symbolic.jsonl"} <= names
    assert not shipped_files() - names, f"in the package tree but not in the wheel: {sorted(shipped_files() - names)}"

    # A bare venv (no pip of its own: the checkout's pip installs into it), the wheel without its
    # dependencies; those come from the checkout's venv on PYTHONPATH. Its site-packages holds sa_sft
    # only as an editable finder that a .pth file activates, and PYTHONPATH processes no .pth file,
    # so `import sa_sft` can only find the wheel's copy (asserted below, not assumed).
    made = run([sys.executable, "-m", "venv", "--without-pip", venv])
    assert made.returncode == 0, made.stderr
    installed = run([sys.executable, "-m", "pip", "--python", venv / "bin" / "python", "install", "--no-deps",
                     "--no-index", "-q", wheel])
    assert installed.returncode == 0, installed.stdout[-3000:] + installed.stderr[-3000:]
    deps = os.pathsep.join(dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]))
    env = {**os.environ, "PYTHONPATH": deps, "SA_SFT_CACHE_DIR": os.environ["SA_SFT_CACHE_DIR"], "HF_HUB_OFFLINE": "1"}
    elsewhere.mkdir()
    sa_sft = venv / "bin" / "sa-sft"

    version = run([sa_sft, "--version"], cwd=elsewhere, env=env)
    assert (version.returncode, version.stdout) == (0, f"sa-sft {VERSION}\n"), version.stderr[-3000:]

    where = run([venv / "bin" / "python", "-c",
                 "import json, sa_sft, sa_sft.config as c, sa_sft.data.task as t, sa_sft.train.ds_config as d; "
                 "print(json.dumps({'package': sa_sft.__file__, 'preset': str(d.load_preset('zero3')[0]), "
                 "'zero3': d.load_preset('zero3')[1], 'config': str(c.BUILTIN_CONFIG_DIR / 'tiny.yaml'), "
                 "'task': str(t.resolve_task_path('builtin:gsm_symbolic'))}))"], cwd=elsewhere, env=env)
    assert where.returncode == 0, where.stderr[-3000:]
    where = json.loads(where.stdout)
    assert where["zero3"] == json.loads((PACKAGE / "ds_configs" / "zero3.json").read_text())
    for key in ("package", "preset", "config", "task"):
        assert Path(where[key]).is_relative_to(venv), (key, where[key])  # the wheel's copy, not the checkout's
        assert Path(where[key]).is_file(), (key, where[key])

    help_ = run([sa_sft, "run", "tiny", "--help"], cwd=elsewhere, env=env)
    assert help_.returncode == 0 and help_.stdout.startswith("usage: sa-sft run"), help_.stderr[-3000:]
    assert "train.deepspeed_config" in help_.stdout

    # The tiny model's config.json from the cache; on the CPU it would say only that nothing runs on a GPU.
    plan = run([sa_sft, "plan", "tiny", "train.device=cuda", "generate.device=cuda", "cluster.gpus_per_node=2",
                "cluster.gpu_memory_gib=80"], cwd=elsewhere, env=env)
    assert plan.returncode == 0, plan.stdout[-3000:] + plan.stderr[-3000:]
    assert plan.stdout.startswith("model ") and "tiny-smollm2" in plan.stdout and "GiB: fits" in plan.stdout

    out = elsewhere / "scripts"
    wrote = run([sa_sft, "slurm-scripts", "scripts"], cwd=elsewhere, env=env)
    assert wrote.returncode == 0, wrote.stderr[-3000:]
    assert wrote.stdout.split() == [f"scripts/{name}" for name in SCRIPTS]
    for name in SCRIPTS:
        assert (out / name).read_bytes() == (SCRIPTS_DIR / name).read_bytes(), name
        assert (out / name).stat().st_mode & stat.S_IXUSR, name


def test_slurm_scripts_refuses_to_overwrite_an_edited_copy(tmp_path, capsys):
    out = tmp_path / "a" / "b"
    assert main(["slurm-scripts", str(out)]) == 0
    assert capsys.readouterr().out.split() == [str(out / name) for name in SCRIPTS]
    assert sorted(p.name for p in out.iterdir()) == SCRIPTS
    assert os.access(out / "submit_chain.sh", os.X_OK)

    assert main(["slurm-scripts", str(out)]) == 0  # identical copies: nothing to refuse
    capsys.readouterr()
    edited = out / "train.sbatch"
    edited.write_text(edited.read_text().replace("--nodes=2", "--nodes=4"))
    (out / "generate.sbatch").unlink()
    assert main(["slurm-scripts", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and str(edited) in err and "--overwrite" in err
    assert "--nodes=4" in edited.read_text() and not (out / "generate.sbatch").exists()  # nothing written

    assert main(["slurm-scripts", str(out), "--overwrite"]) == 0
    assert edited.read_bytes() == (SCRIPTS_DIR / "train.sbatch").read_bytes()
    assert (out / "generate.sbatch").exists()

    (tmp_path / "file").write_text("x")
    assert main(["slurm-scripts", str(tmp_path / "file")]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_the_checkouts_slurm_folder_is_the_packaged_one():
    """`sbatch slurm/sa_sft.sbatch` in a checkout submits the same files the wheel ships (a link)."""
    assert (REPO / "slurm").is_symlink() and (REPO / "slurm").resolve() == SCRIPTS_DIR
    assert sorted(p.name for p in SCRIPTS_DIR.iterdir()) == SCRIPTS


def test_version_is_the_projects(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out == f"sa-sft {VERSION}\n"
