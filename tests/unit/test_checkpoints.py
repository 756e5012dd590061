"""The trainer's checkpoint policy and resume decision, without DeepSpeed: when to save, where a
rerun starts, what a cut-short save leaves and what pruning keeps."""
import json

import pytest

from sa_sft.rundir import CheckpointDir
from sa_sft.train.checkpoints import CheckpointPolicy, discard, plan_resume, prune, trim_metrics


@pytest.mark.parametrize("every, total, expected", [
    (3, 10, [3, 6, 9, 10]),   # every 3 steps, and the last step always
    (0, 5, [5]),              # 0: only at the end
    (5, 10, [5, 10]),         # the last step is also a multiple: saved once
    (1, 3, [1, 2, 3]),
])
def test_checkpoints_at_the_cadence_and_after_the_last_step(every, total, expected):
    policy = CheckpointPolicy(every=every, total_steps=total)
    assert [step for step in range(1, total + 1) if policy.due(step)] == expected


def test_a_stop_request_saves_at_once():
    policy = CheckpointPolicy(every=0, total_steps=10)
    assert policy.due(4, stop_requested=True) and not policy.due(4)


def make(ckpts: CheckpointDir, *steps: int, latest: int | None = None) -> None:
    for step in steps:
        ckpts.folder(ckpts.tag(step)).mkdir(parents=True)
    if latest is not None:
        ckpts.set_latest(ckpts.tag(latest))


def test_a_fresh_run_starts_from_scratch(tmp_path):
    assert plan_resume(CheckpointDir(tmp_path / "none")) .tag is None
    ckpts = CheckpointDir(tmp_path)
    make(ckpts, 2)  # a save cut short before `latest` was ever written
    plan = plan_resume(ckpts)
    assert plan.tag is None and plan.discard == ["step-0000002"]


def test_resume_from_latest_and_discard_saves_cut_short(tmp_path):
    ckpts = CheckpointDir(tmp_path)
    make(ckpts, 2, 4, 6, latest=4)  # step 6's save never completed on every rank
    plan = plan_resume(ckpts)
    assert plan.tag == "step-0000004" and plan.discard == ["step-0000006"]
    discard(ckpts, plan.discard)
    assert ckpts.tags() == ["step-0000002", "step-0000004"]


def test_latest_naming_a_missing_folder_is_not_resumed(tmp_path):
    ckpts = CheckpointDir(tmp_path)
    make(ckpts, 2, latest=2)
    ckpts.set_latest("step-0000009")
    assert plan_resume(ckpts).tag is None


def test_pruning_keeps_the_newest_and_latest(tmp_path):
    ckpts = CheckpointDir(tmp_path)
    make(ckpts, 1, 2, 3, 4, latest=3)
    assert prune(ckpts, keep_last=1) == ["step-0000001", "step-0000002"]
    assert ckpts.tags() == ["step-0000003", "step-0000004"] and ckpts.latest() == "step-0000003"


def test_metrics_past_the_checkpoint_are_dropped_on_resume(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in range(1, 7)))
    trim_metrics(path, upto_step=4)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3, 4]
    trim_metrics(tmp_path / "absent.jsonl", 3)  # nothing to trim on a fresh run


def test_a_time_cadence_besides_the_step_cadence():
    policy = CheckpointPolicy(every=0, total_steps=100, every_seconds=1800)
    assert not policy.time_due(1799) and policy.time_due(1800)
    assert policy.due(7, time_due=True) and not policy.due(7)
    assert not CheckpointPolicy(every=0, total_steps=100).time_due(10**9)  # 0: never by time


def test_gpu_runs_checkpoint_every_30_minutes_by_default():
    from sa_sft.config import load_config
    assert load_config("tiny", ["train.device=cuda"]).train.checkpoint_every_minutes == 30
    assert load_config("tiny").train.checkpoint_every_minutes == 0
    assert load_config("tiny", ["train.device=cuda", "train.checkpoint_every_minutes=5"]).train.checkpoint_every_minutes == 5


def test_stopping_before_a_time_limit_leaves_room_for_a_step_and_the_measured_save():
    from sa_sft.train.checkpoints import near_deadline
    assert not near_deadline(None, save_seconds=600, step_seconds=10)  # no time limit
    # 10 s steps, a 200 s save: stop with less than 1.5 x 200 + 2 x 10 + 60 = 380 s left.
    assert not near_deadline(381, save_seconds=200, step_seconds=10)
    assert near_deadline(379, save_seconds=200, step_seconds=10)


def test_scontrol_end_times():
    import time
    from sa_sft.cluster.slurm import parse_end_time
    assert parse_end_time("Unknown") is None
    end = parse_end_time("2026-11-29T14:30:05")
    assert time.localtime(end)[:6] == (2026, 11, 29, 14, 30, 5)
