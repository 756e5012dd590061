"""The mix stage end to end on the tiny model's tokenizer, against the implementation it replaced
(benchmarks/legacy.py: every row in memory, tokenized one by one, ranks from Dataset.from_list): the
same rank datasets (rows, order, tokens, labels, column types), held-out files and manifest."""
import json
import random
import shutil
import sys
from pathlib import Path

import pytest

from sa_sft.config import load_config
from sa_sft.generate.dedup import DuplicateIndex
from sa_sft.generate.stage import Selection
from sa_sft.io import atomic_write_jsonl
from sa_sft.rundir import RunDir

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from legacy import old_mix_run_stage  # noqa: E402

WORDS = "the a how why what river code egg number train light sum cat prime water city seven nine".split()


def sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + rng.choice([".", "?", "!\n", " ", ""])


def dialogues(n: int, seed: int = 0, task_ids: list[str] = ()) -> list[dict]:
    """Self-dialogues as the generate stage writes them: some cut at the token cap, some of four turns."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        turns = 4 if rng.random() < 0.2 else 2
        messages = []
        for t in range(turns):
            role = "user" if t % 2 == 0 else "assistant"
            message = {"role": role, "content": sentence(rng, rng.randrange(3, 150 if role == "assistant" else 25))}
            if role == "assistant" and rng.random() < 0.2:
                message["truncated"] = True
            messages.append(message)
        row = {"id": f"self-{i}", "messages": messages, "seeds": [i, i + 1], "finish_reasons": ["stop"] * turns}
        if task_ids:
            row["task_id"] = task_ids[i]
        out.append(row)
    return out


def generated(root: Path, rows: list[dict], shard_size: int = 16) -> RunDir:
    """A run directory whose generate stage is finished with these rows (through the real shard walk)."""
    run = RunDir(root).create()
    stage = run.open_stage("generate", {"rows": len(rows)})
    shards = [rows[k:k + shard_size] for k in range(0, len(rows), shard_size)]
    for k, shard in enumerate(shards):
        atomic_write_jsonl(run.shard(k), shard)
    selection = Selection(run, len(rows), DuplicateIndex(near_threshold=1.0), None).walk(len(shards))
    stage.finish(shards=selection.shards, num_samples=selection.have)
    return run


def run_both(tmp_path: Path, overrides: list[str], rows: list[dict]) -> tuple[RunDir, RunDir, dict, dict]:
    from sa_sft.mix.stage import inputs, run_stage
    cfg = load_config("tiny", overrides)
    new = generated(tmp_path / "new", rows)
    old = RunDir(tmp_path / "old")
    shutil.copytree(new.root, old.root)
    stage = new.open_stage("mix", inputs(cfg, new))
    manifest = run_stage(cfg, new, stage)
    old_manifest = old_mix_run_stage(cfg, old)
    return new, old, manifest, old_manifest


def assert_same_output(new: RunDir, old: RunDir, manifest: dict, old_manifest: dict, ranks: int) -> None:
    from datasets import load_from_disk
    assert manifest == old_manifest
    for rank in range(ranks):
        a, b = load_from_disk(str(new.rank_data(rank))), load_from_disk(str(old.rank_data(rank)))
        assert a.features == b.features
        assert len(a) == len(b) > 0
        assert a.to_list() == b.to_list()
    assert not new.rank_data(ranks).exists()
    for name in ("task", "self"):
        assert new.heldout(name).read_bytes() == old.heldout(name).read_bytes()
    assert not new.mix_work.exists()  # the scratch Arrow files are gone


@pytest.mark.parametrize("overrides", [
    [],
    ["train.packing=true", "train.train_on_prompt=true", "mix.ratio_unit=tokens", "mix.self_ratio=0.5"],
    ["train.max_seq_len=200", "train.overlong=drop", "train.ranks=3"],
    ["train.max_seq_len=110", "mix.self_ratio=0.7", "train.packing=true", "mix.num_proc=2"],
], ids=["default", "packed-tokens-prompt", "overlong-dropped", "short-packed-2-processes"])
def test_the_same_rank_data_as_before(tmp_path, tiny_model, overrides):
    new, old, manifest, old_manifest = run_both(tmp_path, overrides, dialogues(70))
    ranks = load_config("tiny", overrides).train.ranks
    assert_same_output(new, old, manifest, old_manifest, ranks)
    if "train.max_seq_len=110" in overrides:  # the case meant to cut answers away entirely
        assert manifest["dropped"]["no_loss_tokens"] > 0 and manifest["truncated"] > 0
    if "train.overlong=drop" in overrides:
        assert manifest["dropped"]["overlong"] > 0


def test_external_rows_and_skipped_task_rows(tmp_path, tiny_model):
    external = tmp_path / "external.jsonl"
    rng = random.Random(3)
    lines = [json.dumps({"messages": [{"role": "user", "content": sentence(rng, 10)},
                                      {"role": "assistant", "content": sentence(rng, 30)}]}) for _ in range(40)]
    lines.insert(5, "{not json")
    external.write_text("\n".join(lines) + "\n")
    overrides = [f"data.external_path={external}", "mix.external_ratio=0.5", "data.on_bad_row=skip"]
    new, old, manifest, old_manifest = run_both(tmp_path, overrides, dialogues(60, seed=1))
    assert_same_output(new, old, manifest, old_manifest, 2)
    assert manifest["counts"]["external"]["samples"] > 0


def test_rewrites(tmp_path, tiny_model):
    from sa_sft.data.task import read_task_data
    cfg = load_config("tiny")
    task_ids = [row["id"] for row in read_task_data(cfg.data.task_path).rows[:cfg.data.max_task_samples]]
    rows = dialogues(40, seed=2, task_ids=task_ids[::-1][:40])  # some task rows without a rewrite
    new, old, manifest, old_manifest = run_both(
        tmp_path, ["generate.strategy=rewrite", "mix.self_ratio=0", "data.heldout_self=0"], rows)
    assert_same_output(new, old, manifest, old_manifest, 2)
    assert manifest["counts"]["self"]["samples"] == 0


def test_too_few_self_dialogues_is_one_line(tmp_path, tiny_model):
    from sa_sft.errors import UserError
    from sa_sft.mix.stage import inputs, run_stage
    cfg = load_config("tiny")
    run = generated(tmp_path / "run", dialogues(20))
    with pytest.raises(UserError, match="needs 40 self samples for 40 task rows but only 12"):
        run_stage(cfg, run, run.open_stage("mix", inputs(cfg, run)))
    assert not run.mix_work.exists() and not run.rank_data(0).exists()


def test_num_proc():
    import os

    from sa_sft.mix.tokenize import ROWS_PER_PROCESS, resolve_num_proc
    assert resolve_num_proc(3, 10) == 3  # mix.num_proc set: as set
    assert resolve_num_proc(0, ROWS_PER_PROCESS - 1) == 1  # too few rows to pay for a second process
    cores = len(os.sched_getaffinity(0))
    # Automatic: never more than the cores, nor than the rows allow, and at least one.
    assert 1 <= resolve_num_proc(0, 10**9) <= cores
    assert resolve_num_proc(0, 2 * ROWS_PER_PROCESS) <= 2
