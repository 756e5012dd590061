"""When the trainer saves a checkpoint, where a rerun resumes, and which checkpoints are kept.

No DeepSpeed in here: each decision is a small function of the step counts and of what is on
disk, so it is tested on its own. The trainer (recipe.py) carries them out.
"""
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from sa_sft.io import atomic_write_text
from sa_sft.rundir import CheckpointDir


@dataclass(frozen=True)
class CheckpointPolicy:
    """`train.checkpoint_every` steps and `train.checkpoint_every_minutes` (0: off), on a stop request,
    and after the last step, so a failure after training (the export, its check) never costs the
    training again."""
    every: int
    total_steps: int
    every_seconds: float = 0.0

    def time_due(self, seconds_since_save: float) -> bool:
        return bool(self.every_seconds) and seconds_since_save >= self.every_seconds

    def due(self, step: int, stop_requested: bool = False, time_due: bool = False) -> bool:
        """Save after the optimizer step that brought the count of finished steps to `step`?"""
        if step >= self.total_steps:
            return True
        return stop_requested or time_due or bool(self.every and step % self.every == 0)


# Seconds kept in hand before a job's time limit, besides the next step and a save.
DEADLINE_MARGIN_S = 60


def near_deadline(seconds_left: float | None, save_seconds: float, step_seconds: float) -> bool:
    """Stop now (checkpoint, exit, requeue) if another step and then a save might not finish before the
    job's time limit. `save_seconds` is the last checkpoint's measured save time."""
    if seconds_left is None:
        return False
    return seconds_left < 1.5 * save_seconds + 2 * step_seconds + DEADLINE_MARGIN_S


@dataclass(frozen=True)
class ResumePlan:
    """Where a (re)started trainer begins: the newest complete checkpoint, if any, and the folders of
    saves a crash cut short (newer than `latest`; never loaded, removed before training)."""
    tag: str | None
    discard: list[str] = field(default_factory=list)


def plan_resume(ckpts: CheckpointDir) -> ResumePlan:
    """`latest` is written (atomically, by rank 0) only after every rank finished saving, so the tag
    it names is whole; any checkpoint folder newer than it is a save that was cut short."""
    latest = ckpts.latest()
    return ResumePlan(tag=latest, discard=[tag for tag in ckpts.tags() if tag > (latest or "")])


def discard(ckpts: CheckpointDir, tags: list[str]) -> None:
    for tag in tags:
        shutil.rmtree(ckpts.folder(tag), ignore_errors=True)


def prune(ckpts: CheckpointDir, keep_last: int) -> list[str]:
    """Remove all but the newest `keep_last` checkpoints (never the one `latest` names); returns the removed tags."""
    tags = ckpts.tags()
    keep = set(tags[-keep_last:]) | {ckpts.latest()}
    removed = [tag for tag in tags if tag not in keep]
    discard(ckpts, removed)
    return removed


def trim_metrics(path: Path, upto_step: int) -> None:
    """On resume, drop metric lines past the checkpoint so the curve continues without repeats."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= upto_step]
    atomic_write_text(path, "".join(line + "\n" for line in kept))
