"""The mix stage: task data and self-dialogues mixed at lambda, tokenized, split per rank.

Held-out task rows and self-dialogues are set aside first (they feed evaluation and are
never trained on). The rest is mixed as `round(self_ratio * n_task)` self-dialogues per
the task rows, shuffled with the run seed, tokenized once through the shared chat
renderer (loss on assistant tokens only) and written as one Arrow dataset per rank.
"""
import logging
import random
import shutil
from pathlib import Path

from sa_sft.chat import tokenize_conversation
from sa_sft.config import Config, section_for_results
from sa_sft.data.task import read_task_data
from sa_sft.errors import UserError
from sa_sft.generate.stage import load_self_dialogues
from sa_sft.io import atomic_write_jsonl, read_json, sha256_file
from sa_sft.models import resolve_model
from sa_sft.stage import open_stage, upstream_fingerprint

log = logging.getLogger("sa_sft.mix")


def split_heldout(rows: list[dict], n_heldout: int, seed: int, name: str) -> tuple[list[dict], list[dict]]:
    """(train, heldout): a seeded shuffle, the first n_heldout rows held out."""
    order = list(rows)
    random.Random(f"{seed}/heldout/{name}").shuffle(order)
    return order[n_heldout:], order[:n_heldout]


def mix_samples(task: list[dict], self_pool: list[dict], self_ratio: float, seed: int) -> list[dict]:
    """Task rows plus round(self_ratio * len(task)) self-dialogues, shuffled with the seed."""
    n_self = round(self_ratio * len(task))
    if n_self > len(self_pool):
        raise UserError(f"mix.self_ratio={self_ratio} needs {n_self} self-dialogues for {len(task)} task rows "
                        f"but only {len(self_pool)} are left after holding out data.heldout_self; "
                        f"raise generate.num_samples by at least {n_self - len(self_pool)}")
    mixed = [{**row, "source": "task"} for row in task] + [{**row, "source": "self"} for row in self_pool[:n_self]]
    random.Random(f"{seed}/mix").shuffle(mixed)
    return mixed


def task_train_count(cfg: Config, task_rows: int) -> int:
    return max(0, min(task_rows, cfg.data.max_task_samples or task_rows) - cfg.data.heldout_task)


def check_self_supply(cfg: Config, task_rows: int) -> None:
    """Fail before generation if generate.num_samples cannot cover lambda x task rows + the held-out ones."""
    needed = round(cfg.mix.self_ratio * task_train_count(cfg, task_rows)) + cfg.data.heldout_self
    if cfg.generate.strategy != "rewrite" and cfg.generate.num_samples < needed:
        raise UserError(f"config key generate.num_samples ({cfg.generate.num_samples}) is too small: "
                        f"mix.self_ratio={cfg.mix.self_ratio} x {task_train_count(cfg, task_rows)} task rows "
                        f"+ data.heldout_self={cfg.data.heldout_self} needs {needed}")


def split_ranks(samples: list, ranks: int) -> list[list]:
    """Round-robin per rank, cut to equal length so every rank runs the same number of steps."""
    per_rank = len(samples) // ranks
    return [samples[r::ranks][:per_rank] for r in range(ranks)]


def mix_inputs(cfg: Config, run_dir: Path, task_path: Path) -> dict:
    return {"generate": upstream_fingerprint(run_dir, "generate"), "task_sha256": sha256_file(task_path),
            "seed": cfg.seed, "data": section_for_results(cfg.data), "mix": section_for_results(cfg.mix),
            "ranks": cfg.train.ranks, "max_seq_len": cfg.train.max_seq_len, "overlong": cfg.train.overlong}


def run_mix(cfg: Config, run_dir: Path, overwrite: bool = False) -> dict:
    from datasets import Dataset
    from transformers import AutoTokenizer

    task_data = read_task_data(cfg.data.task_path, cfg.data.on_bad_row)
    stage = open_stage(run_dir, "mix", mix_inputs(cfg, run_dir, task_data.path), overwrite)
    if stage is None:
        return read_json(run_dir / "mix" / "manifest.json")

    task_rows = task_data.rows[: cfg.data.max_task_samples or None]
    task_train, task_heldout = split_heldout(task_rows, cfg.data.heldout_task, cfg.seed, "task")
    generated = load_self_dialogues(run_dir)
    if cfg.generate.strategy == "rewrite":
        # SDFT-style: train on the model's own rewrites of the task answers; evaluate on the originals.
        rewrites = {row["task_id"]: row["messages"] for row in generated}
        task_train = [{**row, "messages": rewrites.get(row["id"], row["messages"])} for row in task_train]
        generated = []
    self_train, self_heldout = split_heldout(generated, cfg.data.heldout_self, cfg.seed, "self")
    if not task_train:
        raise UserError(f"{task_data.path}: no task rows left for training after holding out "
                        f"data.heldout_task={cfg.data.heldout_task}")
    mixed = mix_samples(task_train, self_train, cfg.mix.self_ratio, cfg.seed)

    tokenizer = AutoTokenizer.from_pretrained(resolve_model(cfg.model.path), trust_remote_code=cfg.model.trust_remote_code)
    counts = {src: {"samples": 0, "tokens": 0, "loss_tokens": 0} for src in ("task", "self")}
    dropped = {"overlong": 0, "no_loss_tokens": 0}
    truncated = 0
    tokenized = []
    for row in mixed:
        t = tokenize_conversation(tokenizer, row["messages"], cfg.train.max_seq_len)
        if t.truncated and cfg.train.overlong == "drop":
            dropped["overlong"] += 1
            continue
        if t.num_loss_tokens == 0:
            dropped["no_loss_tokens"] += 1
            continue
        truncated += t.truncated
        tokenized.append({"id": row["id"], "source": row["source"], "input_ids": t.input_ids, "labels": t.labels})
    per_rank = split_ranks(tokenized, cfg.train.ranks)
    dropped["rank_remainder"] = len(tokenized) - sum(map(len, per_rank))
    if not per_rank[0]:
        raise UserError(f"mix: only {len(tokenized)} usable samples for train.ranks={cfg.train.ranks}")

    rank_files = []
    for rank, rows in enumerate(per_rank):
        for row in rows:
            c = counts[row["source"]]
            c["samples"] += 1
            c["tokens"] += len(row["input_ids"])
            c["loss_tokens"] += sum(1 for x in row["labels"] if x != -100)
        final = stage.dir / f"rank-{rank:05d}"
        tmp = stage.dir / f".rank-{rank:05d}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        Dataset.from_list(rows).save_to_disk(str(tmp))
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        rank_files.append(final.name)
    atomic_write_jsonl(stage.dir / "heldout" / "task.jsonl", task_heldout)
    atomic_write_jsonl(stage.dir / "heldout" / "self.jsonl", self_heldout)

    realized = counts["self"]["samples"] / max(counts["task"]["samples"], 1)
    log.info("mix: %d task + %d self samples over %d ranks (realized self_ratio %.3f; %d/%d tokens); "
             "held out %d task, %d self; truncated %d; dropped %s",
             counts["task"]["samples"], counts["self"]["samples"], cfg.train.ranks, realized,
             counts["task"]["tokens"], counts["self"]["tokens"], len(task_heldout), len(self_heldout),
             truncated, dropped)
    return stage.finish(
        counts=counts, realized_self_ratio=round(realized, 4), ranks=cfg.train.ranks,
        rank_dirs=rank_files, samples_per_rank=len(per_rank[0]),
        heldout={"task": len(task_heldout), "self": len(self_heldout)},
        truncated=truncated, dropped=dropped, task_rows_skipped=len(task_data.skipped),
        task_path=str(task_data.path))
