"""The implementations before issue 14 ("Scale"), kept verbatim as a reference: the baseline that
benchmarks/scale.py measures the new ones against, and the output tests/unit/test_mix_stage.py
checks the new mix stage reproduces row for row. Nothing in sa_sft/ imports this.

- `OldDuplicateIndex`: pure-Python MinHash (32 blake2b hashes per shingle), LSH buckets holding
  every kept turn's shingle set, exact Jaccard against every bucket member.
- `old_mix_run_stage`: every row loaded, tokenized serially with `tokenize_conversation` (four
  chat-template renderings per two-turn dialogue), ranks built with `Dataset.from_list`.
"""
import hashlib
import logging
import random
from dataclasses import dataclass, field

from sa_sft.chat import IGNORE_INDEX, tokenize_conversation
from sa_sft.config import Config
from sa_sft.data.packing import pack, packing_efficiency
from sa_sft.data.task import read_task_data
from sa_sft.errors import UserError
from sa_sft.generate.filters import normalize, words
from sa_sft.io import atomic_dir, atomic_write_jsonl
from sa_sft.models import resolve_model
from sa_sft.rundir import RunDir

log = logging.getLogger("sa_sft.mix")

# ---- sa_sft/generate/filters.py before issue 14
def shingles(text: str, n: int = 5) -> set:
    tokens = words(text)
    return {" ".join(tokens[i:i + n]) for i in range(max(1, len(tokens) - n + 1))}


def minhash_signature(items: set, num_perm: int) -> tuple:
    """MinHash over salted 64-bit hashes: P(equal slot) = Jaccard similarity of the sets."""
    sig = []
    for seed in range(num_perm):
        salt = seed.to_bytes(2, "little")
        sig.append(min(int.from_bytes(hashlib.blake2b(salt + s.encode(), digest_size=8).digest(), "little")
                       for s in items) if items else 0)
    return tuple(sig)


@dataclass
class OldDuplicateIndex:
    """Exact (normalized hash) and near (MinHash LSH over word 5-grams) duplicates of user turns,
    across every shard seen so far. Shards are fed in shard order, so the first copy wins."""
    near_threshold: float = 0.8
    num_perm: int = 32
    bands: int = 8
    exact: set = field(default_factory=set)
    buckets: dict = field(default_factory=dict)

    def check_and_add(self, text: str) -> str | None:
        key = hashlib.sha256(normalize(text).encode()).hexdigest()
        if key in self.exact:
            return "duplicate"
        items = shingles(text)
        sig = minhash_signature(items, self.num_perm)
        rows = self.num_perm // self.bands
        band_keys = [(b, sig[b * rows:(b + 1) * rows]) for b in range(self.bands)]
        for band in band_keys:
            for other_items in self.buckets.get(band, ()):
                if len(items & other_items) / max(1, len(items | other_items)) >= self.near_threshold:
                    return "near_duplicate"
        self.exact.add(key)
        for band in band_keys:
            self.buckets.setdefault(band, []).append(items)
        return None



# The packer is today's (sa_sft.data.packing.pack): its algorithm changed in issue 14 too (best fill),
# and the comparison here is about how rows are read, tokenized and split, not how they are packed.


# ---- sa_sft/mix/stage.py before issue 14
def split_heldout(rows: list[dict], n_heldout: int, seed: int, name: str) -> tuple[list[dict], list[dict]]:
    """(train, heldout): a seeded shuffle, the first n_heldout rows held out."""
    order = list(rows)
    random.Random(f"{seed}/heldout/{name}").shuffle(order)
    return order[n_heldout:], order[:n_heldout]


def take_ratio(task: list[dict], pool: list[dict], ratio: float, unit: str, source: str) -> list[dict]:
    """The first rows of `pool` that make `ratio` x the task data, counted in samples or tokens."""
    if unit == "samples":
        n = round(ratio * len(task))
        if n > len(pool):
            raise UserError(f"mix: a {source} ratio of {ratio} needs {n} {source} samples for {len(task)} task rows "
                            f"but only {len(pool)} are available"
                            + (" after holding out data.heldout_self; raise generate.num_samples by at least "
                               f"{n - len(pool)}" if source == "self" else ""))
        return pool[:n]
    budget = ratio * sum(len(row["input_ids"]) for row in task)
    chosen, total = [], 0
    for row in pool:
        if total >= budget:
            break
        chosen.append(row)
        total += len(row["input_ids"])
    if total < budget:
        raise UserError(f"mix: a {source} ratio of {ratio} needs {budget:.0f} {source} tokens but only "
                        f"{total} are available")
    return chosen


def mix_samples(task: list[dict], self_pool: list[dict], self_ratio: float, seed: int, unit: str = "samples",
                external: list[dict] = (), external_ratio: float = 0.0) -> list[dict]:
    """Task rows plus self-dialogues (and external rows) at their ratios, shuffled with the seed."""
    mixed = [{**row, "source": "task"} for row in task]
    mixed += [{**row, "source": "self"} for row in take_ratio(task, self_pool, self_ratio, unit, "self")]
    if external_ratio:
        mixed += [{**row, "source": "external"} for row in take_ratio(task, list(external), external_ratio, unit, "external")]
    random.Random(f"{seed}/mix").shuffle(mixed)
    return mixed


def split_ranks(samples: list, ranks: int) -> list[list]:
    """Round-robin per rank, cut to equal length so every rank runs the same number of steps."""
    per_rank = len(samples) // ranks
    return [samples[r::ranks][:per_rank] for r in range(ranks)]


def old_mix_run_stage(cfg: Config, run: RunDir, stage=None) -> dict:
    from datasets import Dataset
    from transformers import AutoTokenizer

    task_data = read_task_data(cfg.data.task_path, cfg.data.on_bad_row, max_row_bytes=cfg.data.max_row_bytes)
    task_rows = task_data.rows[: cfg.data.max_task_samples or None]
    task_train, task_heldout = split_heldout(task_rows, cfg.data.heldout_task, cfg.seed, "task")
    generated = run.load_self_dialogues()
    if cfg.generate.strategy == "rewrite":
        # SDFT-style: train on the model's own rewrites of the task answers; evaluate on the originals.
        rewrites = {row["task_id"]: row["messages"] for row in generated}
        task_train = [{**row, "messages": rewrites.get(row["id"], row["messages"])} for row in task_train]
        generated = []
    self_train, self_heldout = split_heldout(generated, cfg.data.heldout_self, cfg.seed, "self")
    if not task_train:
        raise UserError(f"{task_data.path}: no task rows left for training after holding out "
                        f"data.heldout_task={cfg.data.heldout_task}")
    external = []
    if cfg.data.external_path:
        external = read_task_data(cfg.data.external_path, cfg.data.on_bad_row, key="data.external_path",
                                  max_row_bytes=cfg.data.max_row_bytes).rows
        random.Random(f"{cfg.seed}/external").shuffle(external)

    tokenizer = AutoTokenizer.from_pretrained(resolve_model(cfg.model.path), trust_remote_code=cfg.model.trust_remote_code)
    dropped = {"overlong": 0, "no_loss_tokens": 0}
    truncated = 0

    def tokenize(rows: list[dict]) -> list[dict]:
        nonlocal truncated
        out = []
        for row in rows:
            t = tokenize_conversation(tokenizer, row["messages"], cfg.train.max_seq_len, cfg.train.train_on_prompt)
            if t.truncated and cfg.train.overlong == "drop":
                dropped["overlong"] += 1
                continue
            if t.num_loss_tokens == 0:
                dropped["no_loss_tokens"] += 1
                continue
            truncated += t.truncated
            out.append({"id": row["id"], "input_ids": t.input_ids, "labels": t.labels})
        return out

    mixed = mix_samples(tokenize(task_train), tokenize(self_train), cfg.mix.self_ratio, cfg.seed, cfg.mix.ratio_unit,
                        tokenize(external) if cfg.mix.external_ratio else [], cfg.mix.external_ratio)
    if cfg.train.packing:
        rows = pack(mixed, cfg.train.max_seq_len)
        efficiency = round(packing_efficiency(rows, cfg.train.max_seq_len), 4)
    else:
        rows = [{**row, "seq_lens": [len(row["input_ids"])], "sources": [row.pop("source")]} for row in mixed]
        efficiency = None
    per_rank = split_ranks(rows, cfg.train.ranks)
    dropped["rank_remainder"] = len(rows) - sum(map(len, per_rank))
    if not per_rank[0]:
        raise UserError(f"mix: only {len(rows)} usable {'packs' if cfg.train.packing else 'samples'} "
                        f"for train.ranks={cfg.train.ranks}")

    counts = {src: {"samples": 0, "tokens": 0, "loss_tokens": 0} for src in ("task", "self", "external")}
    rank_files = []
    for rank, rank_rows in enumerate(per_rank):
        for row in rank_rows:
            offset = 0
            for source, n in zip(row["sources"], row["seq_lens"]):
                c = counts[source]
                c["samples"] += 1
                c["tokens"] += n
                c["loss_tokens"] += sum(1 for x in row["labels"][offset:offset + n] if x != IGNORE_INDEX)
                offset += n
        with atomic_dir(run.rank_data(rank)) as tmp:
            Dataset.from_list(rank_rows).save_to_disk(str(tmp))
        rank_files.append(run.rank_data(rank).name)
    atomic_write_jsonl(run.heldout("task"), task_heldout)
    atomic_write_jsonl(run.heldout("self"), self_heldout)

    unit = "samples" if cfg.mix.ratio_unit == "samples" else "tokens"
    realized = counts["self"][unit] / max(counts["task"][unit], 1)
    log.info("mix: %d task + %d self samples over %d ranks (realized self_ratio %.3f; %d/%d tokens); "
             "held out %d task, %d self; truncated %d; dropped %s",
             counts["task"]["samples"], counts["self"]["samples"], cfg.train.ranks, realized,
             counts["task"]["tokens"], counts["self"]["tokens"], len(task_heldout), len(self_heldout),
             truncated, dropped)
    return dict(
        counts=counts, realized_self_ratio=round(realized, 4), ratio_unit=cfg.mix.ratio_unit, ranks=cfg.train.ranks,
        rank_dirs=rank_files, rows_per_rank=len(per_rank[0]), packed=cfg.train.packing,
        packing_efficiency=efficiency,
        heldout={"task": len(task_heldout), "self": len(self_heldout)},
        truncated=truncated, dropped=dropped, task_rows_skipped=len(task_data.skipped),
        task_path=str(task_data.path))
