"""The generate stage with real vLLM engines in real Ray actors, on the tiny model."""
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

TINY = ["generate.max_user_tokens=12", "generate.max_assistant_tokens=12", "generate.shard_size=8"]


def run_cli(*args, timeout=900):
    return subprocess.run([sys.executable, "-m", "sa_sft.cli", *args], capture_output=True, text=True, timeout=timeout)


def dialogues(run_dir: Path) -> dict:
    from sa_sft.rundir import RunDir
    return {d["id"]: d["messages"] for d in RunDir(run_dir).load_self_dialogues()}


def test_same_samples_with_one_and_two_engines(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    for run_dir, engines in ((one, 1), (two, 2)):
        proc = run_cli("generate", "tiny", f"output_dir={run_dir}", f"generate.engines={engines}",
                       "generate.num_samples=32", *TINY)
        assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = dialogues(one), dialogues(two)
    assert len(a) == 32 and a == b
    manifest = json.loads((two / "generate" / "manifest.json").read_text())
    assert manifest["engines"] == 2 and manifest["num_samples"] == 32
    # One shard at a time per engine: never more requests in an engine than a shard has dialogues.
    assert manifest["schedule"] == "shard" and manifest["engine_in_flight_peak_this_run"] <= 8


def kill_generation_at(run_dir: Path, point: str, args: list[str]) -> None:
    """SIGKILL `sa-sft generate` (and its Ray workers) before the first shard, in the middle of a
    shard, or just after a shard was written."""
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    shards = run_dir / "generate" / "shards"
    count = lambda: len(list(shards.glob("shard-*.jsonl")))
    deadline = time.time() + 600
    if point == "before the first shard":
        while not (run_dir / "generate" / "plan.json").exists() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.05)
        time.sleep(2)  # engines starting or the first shard under way
        assert count() == 0, "the first shard finished before the kill; kill sooner"
    else:
        while count() < 1 and time.time() < deadline and proc.poll() is None:
            time.sleep(0.02)
        first = time.time()
        while count() < 2 and time.time() < deadline and proc.poll() is None:
            time.sleep(0.02)
        if point == "mid-shard":
            time.sleep((time.time() - first) / 2)  # half a shard's time after the second one landed
    assert proc.poll() is None, "generation finished before it could be killed; make it longer"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict:
    """The dialogues of an uninterrupted run, which every interrupted one must reproduce."""
    clean = tmp_path_factory.mktemp("clean") / "run"
    assert run_cli("generate", "tiny", f"output_dir={clean}", "generate.num_samples=64", *TINY).returncode == 0
    return dialogues(clean)


@pytest.mark.parametrize("point", ["before the first shard", "mid-shard", "between shards"])
def test_sigkill_then_rerun_gives_exactly_the_requested_unique_samples(tmp_path, point, uninterrupted):
    run_dir = tmp_path / "run"
    args = [sys.executable, "-m", "sa_sft.cli", "generate", "tiny", f"output_dir={run_dir}",
            "generate.num_samples=64", *TINY]
    kill_generation_at(run_dir, point, args)
    shards = run_dir / "generate" / "shards"
    before = {p.name: p.read_bytes() for p in shards.glob("shard-*.jsonl")}
    assert len(before) < 8 and not (run_dir / "generate" / "manifest.json").exists()
    # What a crash in the middle of a write leaves: a temp file, never a half-written shard.
    shards.mkdir(parents=True, exist_ok=True)
    (shards / ".shard-00007.jsonl.crash.tmp").write_text('{"id": "half-writ')

    rerun = run_cli("generate", "tiny", f"output_dir={run_dir}", "generate.num_samples=64", *TINY)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    if before:
        assert "already on disk; generating only the missing ones" in rerun.stderr
    # Finished shards were kept as they were, not regenerated.
    assert all((shards / name).read_bytes() == data for name, data in before.items())
    got = dialogues(run_dir)
    assert len(got) == 64 and len(set(got)) == 64
    assert not list((run_dir / "generate").rglob("*.tmp"))
    # The same as an uninterrupted run.
    assert got == uninterrupted


def test_rerun_of_a_finished_run_does_nothing_and_changed_sampling_is_refused(tmp_path):
    run_dir = tmp_path / "run"
    assert run_cli("generate", "tiny", f"output_dir={run_dir}", "generate.num_samples=16", *TINY).returncode == 0
    manifest = (run_dir / "generate" / "manifest.json").read_bytes()
    again = run_cli("generate", "tiny", f"output_dir={run_dir}", "generate.num_samples=16", *TINY)
    assert again.returncode == 0 and "already complete" in again.stderr
    assert (run_dir / "generate" / "manifest.json").read_bytes() == manifest
    changed = run_cli("generate", "tiny", f"output_dir={run_dir}", "generate.num_samples=16",
                      "generate.temperature=0.9", *TINY)
    assert changed.returncode == 2
    assert "generate.temperature: 0.7 -> 0.9" in changed.stderr.strip().splitlines()[-1]


def test_engine_killed_mid_run_is_replaced_and_the_run_completes(tmp_path):
    import ray

    from sa_sft.config import load_config
    from sa_sft.engines.pool import ENGINE_NAMESPACE
    from sa_sft.pipeline.runner import run_stage
    from sa_sft.pipeline.stages import spec
    from sa_sft.rundir import RunDir

    cfg = load_config("tiny", [f"output_dir={tmp_path / 'run'}", "generate.num_samples=48", "generate.engines=2",
                               "generate.max_user_tokens=16", "generate.max_assistant_tokens=32", "generate.shard_size=8"])
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=128 * 1024**2)
    killed = []

    def kill_one_engine():
        shards = tmp_path / "run" / "generate" / "shards"
        deadline = time.time() + 600
        while not list(shards.glob("shard-*.jsonl")) and time.time() < deadline:
            time.sleep(0.1)
        victim = ray.get_actor("sa_sft_engine_0_1", namespace=ENGINE_NAMESPACE)
        ray.kill(victim, no_restart=True)
        killed.append(time.time())

    try:
        killer = threading.Thread(target=kill_one_engine, daemon=True)
        killer.start()
        manifest = run_stage(spec("generate"), cfg, RunDir(cfg.output_dir), overwrite=False)
        killer.join(timeout=5)
    finally:
        ray.shutdown()
    assert killed, "the engine was never killed"
    assert manifest["num_samples"] == 48 and manifest["engine_restarts"] >= 1
    assert len(dialogues(Path(cfg.output_dir))) == 48


def test_streamed_shards_share_the_batch_and_survive_sigkill(tmp_path, uninterrupted):
    """generate.schedule=stream: shards join the running batch (more requests in flight than a shard
    holds), each is still written whole, and a SIGKILL + rerun completes the same dialogues (same ids,
    prompts and seeds; the texts may differ, since vLLM's numerics depend on the batch)."""
    run_dir = tmp_path / "run"
    stream = ["generate.schedule=stream", "generate.max_num_seqs=16", "generate.num_samples=64", *TINY]
    kill_generation_at(run_dir, "between shards", [sys.executable, "-m", "sa_sft.cli", "generate", "tiny",
                                                   f"output_dir={run_dir}", *stream])
    shards = run_dir / "generate" / "shards"
    before = {p.name: p.read_bytes() for p in shards.glob("shard-*.jsonl")}
    from sa_sft.rundir import RunDir
    run = RunDir(run_dir)
    # Every shard on disk is whole: its accepted and rejected dialogues add up to the shard's size.
    assert before and all(len(run.shard(k).read_bytes().splitlines()) + len(run.rejected_shard(k).read_bytes().splitlines())
                          == 8 for k in range(32) if run.shard(k).exists())

    rerun = run_cli("generate", "tiny", f"output_dir={run_dir}", *stream)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert all((shards / name).read_bytes() == data for name, data in before.items())
    manifest = json.loads((run_dir / "generate" / "manifest.json").read_text())
    assert manifest["schedule"] == "stream" and manifest["engine_in_flight_peak_this_run"] > 8
    got = dialogues(run_dir)
    assert len(got) == 64 and not list((run_dir / "generate").rglob("*.tmp"))
    rows = {row["id"]: row for row in run.load_self_dialogues()}
    assert all(row["seeds"] and row["messages"][0]["role"] == "user" for row in rows.values())
    assert set(got) <= {f"self-{k:05d}-{i:04d}" for k in range(32) for i in range(8)}


@pytest.mark.parametrize("strategy", ["topic_prompted", "rewrite"])
def test_other_strategies_end_to_end(tmp_path, strategy):
    run_dir = tmp_path / strategy
    extra = (["mix.self_ratio=0", "data.heldout_self=0", "data.max_task_samples=24", "data.heldout_task=4"]
             if strategy == "rewrite" else ["generate.num_samples=16", "data.max_task_samples=24", "data.heldout_task=4",
                                            "mix.self_ratio=0.4"])
    args = ["tiny", f"output_dir={run_dir}", f"generate.strategy={strategy}", *TINY, *extra]
    for stage in ("generate", "mix"):
        proc = run_cli(stage, *args)
        assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads((run_dir / "generate" / "manifest.json").read_text())
    assert manifest["strategy"] == strategy
    rows = dialogues(run_dir)
    mix = json.loads((run_dir / "mix" / "manifest.json").read_text())
    if strategy == "rewrite":
        # One record per task row; a random model's rewrites (nearly) all fail the check and keep the original.
        assert len(rows) == 24 and sum(manifest["rewrites_kept_original"].values()) >= 20
        assert mix["counts"]["self"]["samples"] == 0 and mix["counts"]["task"]["samples"] == 20
    else:
        assert len(rows) == 16
        first = next(iter((run_dir / "generate" / "shards").glob("*.jsonl"))).read_text().splitlines()[0]
        assert json.loads(first)["meta"]["topic"]
        assert mix["counts"]["self"]["samples"] == 8
