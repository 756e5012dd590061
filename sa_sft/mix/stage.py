"""The mix stage: task data and self-dialogues mixed at lambda, tokenized, split per rank.

Held-out task rows and self-dialogues are set aside first (they feed evaluation and are
never trained on). The rest is mixed as `round(self_ratio * n_task)` self-dialogues per
the task rows, shuffled with the run seed, tokenized once through the shared chat
renderer (loss on assistant tokens only) and written as one Arrow dataset per rank.

At scale the rows stream: they are read into an Arrow file as they come (tokenize.py),
tokenized by `datasets.map` in `mix.num_proc` processes, and every later step (held-out split,
ratios, shuffle, packing, ranks) works on row positions and lengths; each rank's rows are then
gathered from the tokenized Arrow files a chunk at a time (ranks.py). The same rows, in the same
order, with the same tokens and labels, as tokenizing every row in one process gave.
"""
import json
import logging
import random
import shutil

import numpy as np

from sa_sft.config import Config, section_for_results
from sa_sft.data.packing import pack_plan
from sa_sft.data.task import TaskReader, open_data
from sa_sft.errors import UserError
from sa_sft.io import atomic_dir, atomic_write_jsonl
from sa_sft.mix.ranks import save_rank, write_rank_rows
from sa_sft.mix.tokenize import SourceWriter, TokenizeRows, resolve_num_proc, tokenize_sources
from sa_sft.models import resolve_model
from sa_sft.rundir import RunDir, Stage

log = logging.getLogger("sa_sft.mix")


def heldout_order(n: int, n_heldout: int, seed: int, name: str) -> tuple[list[int], list[int]]:
    """(train, heldout) positions of n rows: a seeded shuffle, the first n_heldout held out."""
    order = list(range(n))
    random.Random(f"{seed}/heldout/{name}").shuffle(order)  # the permutation depends on n alone
    return order[n_heldout:], order[:n_heldout]


def split_heldout(rows: list[dict], n_heldout: int, seed: int, name: str) -> tuple[list[dict], list[dict]]:
    """(train, heldout): a seeded shuffle, the first n_heldout rows held out."""
    train, heldout = heldout_order(len(rows), n_heldout, seed, name)
    return [rows[i] for i in train], [rows[i] for i in heldout]


def take_ratio(task_lengths: list[int], pool_lengths: list[int], ratio: float, unit: str, source: str) -> int:
    """How many of the pool's first rows make `ratio` x the task data, counted in samples or tokens."""
    if unit == "samples":
        n = round(ratio * len(task_lengths))
        if n > len(pool_lengths):
            raise UserError(f"mix: a {source} ratio of {ratio} needs {n} {source} samples for {len(task_lengths)} task rows "
                            f"but only {len(pool_lengths)} are available"
                            + (" after holding out data.heldout_self; raise generate.num_samples by at least "
                               f"{n - len(pool_lengths)}" if source == "self" else ""))
        return n
    budget = ratio * sum(task_lengths)
    chosen, total = 0, 0
    for length in pool_lengths:
        if total >= budget:
            break
        chosen += 1
        total += length
    if total < budget:
        raise UserError(f"mix: a {source} ratio of {ratio} needs {budget:.0f} {source} tokens but only "
                        f"{total} are available")
    return chosen


def mix_order(task_lengths: list[int], self_lengths: list[int], self_ratio: float, seed: int, unit: str = "samples",
              external_lengths: list[int] = (), external_ratio: float = 0.0) -> list[tuple[str, int]]:
    """(source, position in that source's pool) of each mixed sample, in training order: the task rows
    plus self-dialogues (and external rows) at their ratios, shuffled with the seed."""
    mixed = [("task", i) for i in range(len(task_lengths))]
    mixed += [("self", i) for i in range(take_ratio(task_lengths, self_lengths, self_ratio, unit, "self"))]
    if external_ratio:
        mixed += [("external", i) for i in range(take_ratio(task_lengths, list(external_lengths), external_ratio,
                                                            unit, "external"))]
    random.Random(f"{seed}/mix").shuffle(mixed)
    return mixed


def mix_samples(task: list[dict], self_pool: list[dict], self_ratio: float, seed: int, unit: str = "samples",
                external: list[dict] = (), external_ratio: float = 0.0) -> list[dict]:
    """mix_order over rows: the mixed rows, each with its `source`."""
    lengths = (lambda rows: [len(row["input_ids"]) for row in rows]) if unit == "tokens" else (lambda rows: [0] * len(rows))
    pools = {"task": task, "self": self_pool, "external": list(external)}
    order = mix_order(lengths(task), lengths(self_pool), self_ratio, seed, unit,
                      lengths(pools["external"]) if external_ratio else [], external_ratio)
    return [{**pools[source][i], "source": source} for source, i in order]


def split_ranks(samples: list, ranks: int) -> list[list]:
    """Round-robin per rank, cut to equal length so every rank runs the same number of steps."""
    per_rank = len(samples) // ranks
    return [samples[r::ranks][:per_rank] for r in range(ranks)]


def inputs(cfg: Config, run: RunDir) -> dict:
    return {"generate": run.fingerprint("generate"), "task_sha256": open_data(cfg.data).fingerprint(),
            "seed": cfg.seed, "data": section_for_results(cfg.data), "mix": section_for_results(cfg.mix),
            "ranks": cfg.train.ranks, "max_seq_len": cfg.train.max_seq_len, "overlong": cfg.train.overlong,
            "packing": cfg.train.packing, "train_on_prompt": cfg.train.train_on_prompt,
            "external_sha256": (open_data(cfg.data, "data.external_path").fingerprint()
                                if cfg.data.external_path else None)}


def read_sources(cfg: Config, run: RunDir) -> tuple[dict, TaskReader]:
    """Every candidate row into the Arrow file of sources (task rows, then self-dialogues, then external
    rows), validated as it is read. Returns the count per source and the task file's reader."""
    rewrite = cfg.generate.strategy == "rewrite"
    # SDFT-style: train on the model's own rewrites of the task answers; evaluate on the originals.
    rewrites = {row["task_id"]: row["messages"] for row in run.iter_self_dialogues()} if rewrite else {}
    task = open_data(cfg.data)
    limit = cfg.data.max_task_samples or None
    with SourceWriter(run.mix_sources) as writer:
        for row in task:
            if limit is None or writer.counts["task"] < limit:
                writer.add("task", row, rewrites.get(row["id"]))
        if not rewrite:
            for row in run.iter_self_dialogues():
                writer.add("self", row)
        if writer.counts["task"] <= cfg.data.heldout_task:
            raise UserError(f"{task.path}: no task rows left for training after holding out "
                            f"data.heldout_task={cfg.data.heldout_task}")
        if cfg.data.external_path:
            external = open_data(cfg.data, "data.external_path")
            for row in external:  # read (and checked) even when not mixed in
                if cfg.mix.external_ratio:
                    writer.add("external", row)
    return writer.counts, task


def run_stage(cfg: Config, run: RunDir, stage: Stage) -> dict:
    shutil.rmtree(run.mix_work, ignore_errors=True)  # what an interrupted run left
    run.mix_work.mkdir(parents=True)
    try:
        return mix(cfg, run)
    finally:
        shutil.rmtree(run.mix_work, ignore_errors=True)


def mix(cfg: Config, run: RunDir) -> dict:
    counts_in, task_reader = read_sources(cfg, run)
    offset = {"task": 0, "self": counts_in["task"], "external": counts_in["task"] + counts_in["self"]}
    task_train, task_heldout = heldout_order(counts_in["task"], cfg.data.heldout_task, cfg.seed, "task")
    self_train, self_heldout = heldout_order(counts_in["self"], cfg.data.heldout_self, cfg.seed, "self")
    external = list(range(counts_in["external"]))
    random.Random(f"{cfg.seed}/external").shuffle(external)

    rows = sum(counts_in.values())
    num_proc = resolve_num_proc(cfg.mix.num_proc, rows)
    log.info("mix: tokenizing %d rows in %d process(es)", rows, num_proc)
    fn = TokenizeRows(resolve_model(cfg.model.path), cfg.model.trust_remote_code, cfg.train.max_seq_len,
                      cfg.train.train_on_prompt, one_thread=num_proc > 1)
    tokenized = tokenize_sources(run.mix_sources, fn, num_proc)
    table = tokenized.data.table
    n_tokens = table.column("n_tokens").to_numpy()
    n_loss = table.column("n_loss").to_numpy()
    cut = table.column("truncated").to_numpy(zero_copy_only=False)

    dropped = {"overlong": 0, "no_loss_tokens": 0}
    truncated = 0

    def usable(source: str, positions: list[int]) -> list[int]:
        """The rows training can use, in order (as positions in `tokenized`), counting the others."""
        nonlocal truncated
        idx = offset[source] + np.asarray(positions, dtype=np.int64)
        overlong = cut[idx] & (cfg.train.overlong == "drop")
        no_loss = ~overlong & (n_loss[idx] == 0)
        dropped["overlong"] += int(overlong.sum())
        dropped["no_loss_tokens"] += int(no_loss.sum())
        keep = idx[~overlong & ~no_loss]
        truncated += int(cut[keep].sum())
        return keep.tolist()

    pools = {"task": usable("task", task_train), "self": usable("self", self_train),
             "external": usable("external", external) if cfg.mix.external_ratio else []}
    lengths = {source: n_tokens[pool].tolist() for source, pool in pools.items()}
    order = [pools[source][i] for source, i in
             mix_order(lengths["task"], lengths["self"], cfg.mix.self_ratio, cfg.seed, cfg.mix.ratio_unit,
                       lengths["external"], cfg.mix.external_ratio)]
    if cfg.train.packing:
        units = [[order[i] for i in members] for members in pack_plan(n_tokens[order].tolist(), cfg.train.max_seq_len)]
        efficiency = round(int(n_tokens[order].sum()) / max(1, len(units) * cfg.train.max_seq_len), 4)
    else:
        units = [[p] for p in order]
        efficiency = None
    per_rank = split_ranks(units, cfg.train.ranks)
    dropped["rank_remainder"] = len(units) - sum(map(len, per_rank))
    if not per_rank[0]:
        raise UserError(f"mix: only {len(units)} usable {'packs' if cfg.train.packing else 'samples'} "
                        f"for train.ranks={cfg.train.ranks}")

    source_of = np.repeat(np.array(list(counts_in)), list(counts_in.values()))  # the sources file is in blocks
    counts = {src: {"samples": 0, "tokens": 0, "loss_tokens": 0} for src in ("task", "self", "external")}
    rank_files = []
    for rank, rank_units in enumerate(per_rank):
        members = np.fromiter((p for unit in rank_units for p in unit), dtype=np.int64)
        for source, c in counts.items():
            mine = members[source_of[members] == source]
            c["samples"] += len(mine)
            c["tokens"] += int(n_tokens[mine].sum())
            c["loss_tokens"] += int(n_loss[mine].sum())
        write_rank_rows(run.mix_rank_rows(rank), table, rank_units, packed=cfg.train.packing)
        with atomic_dir(run.rank_data(rank)) as tmp:
            save_rank(run.mix_rank_rows(rank), tmp)
        rank_files.append(run.rank_data(rank).name)
    del tokenized, table  # memory maps of files about to be removed
    heldout = {"task": task_heldout, "self": self_heldout}
    for name, positions in heldout.items():
        atomic_write_jsonl(run.heldout(name), source_rows(run, offset[name], positions))

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
        truncated=truncated, dropped=dropped, task_rows_skipped=len(task_reader.skipped),
        task_path=str(task_reader.path))


def source_rows(run: RunDir, offset: int, positions: list[int]) -> list[dict]:
    """The rows as read (held-out sets: never more than data.heldout_*), by position in the sources file."""
    from datasets import Dataset
    sources = Dataset.from_file(str(run.mix_sources))
    return [json.loads(text) for text in sources.select([offset + p for p in positions])["row"]]
