"""The run directory: every OS error on creating, locking or writing it is one line, and bad training
settings are refused in preflight, not by a dead rank."""
import os
import subprocess

import pytest

from sa_sft.cli import main
from sa_sft.rundir import RunDir


def run_cli(capsys, *args) -> tuple[int, str]:
    code = main(list(args))
    return code, capsys.readouterr().err


@pytest.mark.parametrize("where, code", [
    ("a_file/run", 2),              # a file where a folder should be
    ("/proc/sa_sft_run", 2),        # a pseudo-filesystem that creates nothing
    ("/proc/self/status/run", 2),
    ("/sys/sa_sft_run", 74),        # refused by the kernel (EPERM): a storage error, as a full disk
])
def test_an_output_dir_that_cannot_be_created_is_one_line(tmp_path, capsys, tiny_model, where, code):
    (tmp_path / "a_file").write_text("x")
    output_dir = where if where.startswith("/") else tmp_path / where
    got, err = run_cli(capsys, "mix", "tiny", f"output_dir={output_dir}")
    assert got == code, err
    lines = err.strip().splitlines()
    assert lines[-1].startswith("error: cannot ") and str(output_dir).split("/")[1] in lines[-1]
    assert "Traceback" not in err


def test_an_output_dir_that_is_a_file_is_one_line(tmp_path, capsys, tiny_model):
    target = tmp_path / "run"
    target.write_text("not a folder")
    code, err = run_cli(capsys, "generate", "tiny", f"output_dir={target}")
    assert code == 2 and err.strip().splitlines()[-1].startswith(f"error: cannot use {target}")
    assert target.read_text() == "not a folder"


@pytest.mark.skipif(os.geteuid() != 0 and subprocess.run(["unshare", "-rm", "true"]).returncode != 0,
                    reason="needs root or unprivileged user namespaces for a read-only mount")
def test_a_read_only_parent_is_one_line(tmp_path, tiny_model):
    """A read-only bind mount of the parent (in a private mount namespace): exit 74, nothing written."""
    import sys
    parent = tmp_path / "ro"
    parent.mkdir()
    script = (f"mount --bind {parent} {parent} && mount -o remount,bind,ro {parent} && "
              f"{sys.executable} -m sa_sft.cli mix tiny output_dir={parent}/run")
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True)
    assert proc.returncode == 74, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: cannot write {parent}/run: Read-only file system")
    assert not any(parent.iterdir())


def test_bad_training_settings_are_refused_before_any_stage(tmp_path, capsys, tiny_model):
    for setting, message in [
        ("train.freeze_layers=5", "train.freeze_layers=5 but the model has 2 layers"),
        ("train.freeze_params=[nothing_is_called_this]", "matched no parameter"),
        ("train.freeze_params=['(']", "is not a valid regex"),
    ]:
        code, err = run_cli(capsys, "run", "tiny", f"output_dir={tmp_path / 'run'}", setting)
        assert code == 2 and message in err.strip().splitlines()[-1], err
        assert not (tmp_path / "run").exists()


def test_the_layout_is_the_readme_contract(tmp_path):
    run = RunDir(tmp_path)
    assert run.relative(run.shard(3)) == "generate/shards/shard-00003.jsonl"
    assert run.relative(run.rank_data(1)) == "mix/rank-00001"
    assert run.relative(run.heldout("self")) == "mix/heldout/self.jsonl"
    assert run.relative(run.final) == "train/final"
    assert run.relative(run.checkpoints.folder(run.checkpoints.tag(42))) == "train/checkpoints/step-0000042"
    assert run.relative(run.scores("base")) == "eval/base.json"
    assert run.relative(run.manifest_path("evaluate")) == "evaluate/manifest.json"
    assert run.relative(run.plot("loss")) == "plots/loss.png"
