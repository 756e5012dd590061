"""Faults with the real components: a second run on a busy directory, a full or read-only disk,
a training rank killed mid-run. (Generation and training SIGKILLs are in test_generation.py and
test_training.py, an engine killed mid-run in test_generation.py.)"""
import hashlib
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

pytestmark = pytest.mark.integration

SMALL = ["generate.num_samples=24", "data.max_task_samples=32", "data.heldout_task=8", "data.heldout_self=8",
         "mix.self_ratio=0.5", "generate.max_user_tokens=12", "generate.max_assistant_tokens=16",
         "generate.shard_size=12", "train.micro_batch_size=2", "train.log_every=1"]


def cli(*args, timeout=900, env=None):
    return subprocess.run([sys.executable, "-m", "sa_sft.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def digest(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("faults") / "run"
    proc = cli("generate", "tiny", f"output_dir={run_dir}", *SMALL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


def test_a_second_run_on_a_busy_directory_is_refused(generated, tmp_path):
    run_dir = shutil.copytree(generated, tmp_path / "run")
    assert cli("mix", "tiny", f"output_dir={run_dir}", *SMALL).returncode == 0
    before = {stage: digest(run_dir / stage) for stage in ("generate", "mix")}
    first = subprocess.Popen([sys.executable, "-m", "sa_sft.cli", "train", "tiny", f"output_dir={run_dir}", *SMALL,
                              "train.max_steps=2"], stderr=open(tmp_path / "first.stderr", "w"))
    # The lock is held from the start of the run to its end; the train plan is written inside it.
    deadline = time.time() + 120
    while not (run_dir / "train" / "plan.json").exists() and first.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    second = cli("mix", "tiny", f"output_dir={run_dir}", *SMALL, "mix.self_ratio=0.25", "--overwrite")
    assert first.wait(timeout=600) == 0, (tmp_path / "first.stderr").read_text()[-3000:]
    assert second.returncode == 2
    assert second.stderr.strip().splitlines()[-1] == (
        f"error: run directory {run_dir} is in use by another sa-sft process (lock {run_dir / '.lock'})")
    # Even with --overwrite the refused run changed nothing of the first one's inputs.
    assert {stage: digest(run_dir / stage) for stage in ("generate", "mix")} == before


NAMESPACE_RUN = '''
import hashlib, json, pathlib, subprocess, sys
mount, src, out, size, mode = sys.argv[1:6]
args = json.loads(sys.argv[6])
subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", mount], check=True)
run = pathlib.Path(mount) / "run"
subprocess.run(["cp", "-a", src, str(run)], check=True)
if mode == "read-only":
    subprocess.run(["mount", "-o", "remount,ro", mount], check=True)
files = lambda: {str(p.relative_to(run)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(run.rglob("*")) if p.is_file()}
before = files()
proc = subprocess.run([sys.executable, "-m", "sa_sft.cli", *args, f"output_dir={run}"], capture_output=True, text=True)
after = files()
pathlib.Path(out).write_text(json.dumps({"code": proc.returncode, "stderr": proc.stderr, "before": before, "after": after}))
'''


def run_on_small_disk(src: Path, tmp_path: Path, mode: str, args: list[str]) -> dict:
    """Run sa-sft on a copy of `src` on a tmpfs just big enough for the copy (mode=full) or
    mounted read-only, inside an unprivileged mount namespace."""
    if subprocess.run(["unshare", "-rm", "true"]).returncode != 0:
        pytest.fail("this test needs unprivileged user namespaces (unshare -rm)")
    mount, out = tmp_path / "mnt", tmp_path / "result.json"
    mount.mkdir()
    # tmpfs counts whole pages per file: room for the copy and three pages more (the config's
    # rewrite, the lock, the log), not for what the stage writes.
    size = sum(-(-p.stat().st_size // 4096) * 4096 for p in src.rglob("*") if p.is_file()) + 3 * 4096
    script = tmp_path / "ns.py"
    script.write_text(NAMESPACE_RUN)
    subprocess.run(["unshare", "-rm", sys.executable, str(script), str(mount), str(src), str(out), str(size), mode,
                    json.dumps(args)], check=True, timeout=600, cwd=Path(__file__).resolve().parents[2])
    return json.loads(out.read_text())


@pytest.mark.parametrize("mode, reason", [("full", "No space left on device"), ("read-only", "Read-only file system")])
def test_full_or_read_only_disk_is_a_clear_error_and_loses_nothing(generated, tmp_path, mode, reason):
    result = run_on_small_disk(generated, tmp_path, mode, ["mix", "tiny", *SMALL])
    assert result["code"] == 74, result["stderr"][-3000:]
    assert "Traceback" not in result["stderr"]
    last = result["stderr"].strip().splitlines()[-1]
    assert last.startswith("error: cannot write ") and reason in last and "every file written before is intact" in last
    # Every output of the earlier stage is there, byte for byte; nothing half-written was left behind.
    outputs = lambda files: {k: v for k, v in files.items() if k.startswith("generate/")}
    assert outputs(result["after"]) == outputs(result["before"]) and len(outputs(result["before"])) > 3
    assert not [k for k in result["after"] if k.endswith(".tmp")]
    assert "mix/manifest.json" not in result["after"]


def rank_processes(parent: psutil.Process) -> dict[int, psutil.Process]:
    ranks = {}
    for child in parent.children(recursive=True):
        try:
            if "sa_sft.train.trainer" in " ".join(child.cmdline()) and "RANK" in child.environ():
                ranks[int(child.environ()["RANK"])] = child
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return ranks


def test_a_killed_training_rank_fails_fast_and_the_rerun_resumes(generated, tmp_path):
    run_dir = shutil.copytree(generated, tmp_path / "run")
    args = ["train", "tiny", f"output_dir={run_dir}", *SMALL, "train.max_steps=8", "train.checkpoint_every=2"]
    assert cli("mix", "tiny", f"output_dir={run_dir}", *SMALL).returncode == 0
    log = open(tmp_path / "train.stderr", "w+")  # a file, not a pipe: the run must never block on its output
    proc = subprocess.Popen([sys.executable, "-m", "sa_sft.cli", *args], stderr=log, text=True, start_new_session=True)
    latest = run_dir / "train" / "checkpoints" / "latest"
    deadline = time.time() + 600
    while not (latest.exists() and latest.read_text().strip() >= "step-0000002") and time.time() < deadline:
        assert proc.poll() is None, (tmp_path / "train.stderr").read_text()[-3000:]
        time.sleep(0.05)
    ranks = rank_processes(psutil.Process(proc.pid))
    assert sorted(ranks) == [0, 1]
    ranks[1].send_signal(signal.SIGKILL)
    killed_at = time.time()
    code = proc.wait(timeout=180)
    failed_after = time.time() - killed_at
    stderr = (tmp_path / "train.stderr").read_text()
    assert code != 0 and failed_after < 120, f"exit {code} after {failed_after:.0f} s"
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("error: train: ") and "rerun to resume" in last, last
    gone, alive = psutil.wait_procs(list(ranks.values()), timeout=30)
    assert not alive, "a rank outlived the failed job"
    assert not (run_dir / "train" / "manifest.json").exists()

    rerun = cli(*args)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "resumed from step-" in rerun.stderr
    steps = [json.loads(line)["step"] for line in (run_dir / "train" / "metrics.jsonl").open()]
    assert steps == list(range(1, 9))
