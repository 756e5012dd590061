"""The generate stage: the frozen base model writes self-dialogues into resumable shards.

Shard k is a pure function of (run seed, k). Shards are generated until the accepted
dialogues in shard order reach `generate.num_samples`; the first that many are used, so
the result is the same whatever the number of engines or interruptions.
"""
import collections
import hashlib
import json
import logging
import math
import time
from pathlib import Path

from tqdm import tqdm

from sa_sft import console
from sa_sft.config import Config, GenerateConfig, section_for_results
from sa_sft.data.plan import self_samples_needed
from sa_sft.data.task import TaskData, open_data, read_data
from sa_sft.errors import UserError
from sa_sft.generate.dedup import DuplicateIndex, shard_signatures
from sa_sft.generate.filters import ContaminationIndex, mark_truncated, rejection_reason
from sa_sft.io import atomic_write_jsonl, read_jsonl
from sa_sft.models import model_identity, resolve_model
from sa_sft.rundir import RunDir, Stage

log = logging.getLogger("sa_sft.generate")

MIN_YIELD = 0.05


def task_data_for(cfg: Config) -> TaskData | None:
    """The task set, when generation depends on it: rewrites, or a sample count derived from it."""
    if cfg.generate.strategy == "rewrite" or cfg.generate.num_samples < 0:
        return read_data(cfg.data)
    return None


def inputs(cfg: Config, run: RunDir) -> dict:
    inputs = {"model": model_identity(resolve_model(cfg.model.path)), "seed": cfg.seed,
              "generate": section_for_results(cfg.generate)}
    task_data = task_data_for(cfg)
    if task_data is not None:  # the sample count or the rewrites come from the task set
        inputs.update(task_sha256=open_data(cfg.data).fingerprint(), max_task_samples=cfg.data.max_task_samples,
                      heldout=[cfg.data.heldout_task, cfg.data.heldout_self], self_ratio=cfg.mix.self_ratio)
        rows_read_as = {"format": cfg.data.format, "columns": section_for_results(cfg.data.columns)}
        if rows_read_as != {"format": "auto", "columns": section_for_results(type(cfg.data.columns)())}:
            inputs.update(rows_read_as=rows_read_as)  # only when set: generations made before these keys stay valid
    return inputs


def split_shard(result: dict, gcfg: GenerateConfig | None) -> tuple[list[dict], list[dict]]:
    """Per-dialogue filters; cross-shard ones (duplicates, contamination) run at selection.
    Rewrites (gcfg None) are never rejected: a failed check already kept the original."""
    if gcfg is None:
        return result["dialogues"], []
    accepted, rejected = [], []
    for dialogue in result["dialogues"]:
        reason = rejection_reason(dialogue, gcfg)
        if reason:
            rejected.append({**dialogue, "reason": reason})
        else:
            accepted.append(mark_truncated(dialogue))
    return accepted, rejected


def strings_in(obj) -> list[str]:
    if isinstance(obj, str):
        return [obj]
    if isinstance(obj, dict):
        obj = list(obj.values())
    return [s for item in obj for s in strings_in(item)] if isinstance(obj, list) else []


def contamination_index(gcfg: GenerateConfig) -> ContaminationIndex | None:
    """Word n-grams of every string (questions, choices, answers, messages) in the named eval sets."""
    if not gcfg.contamination_paths:
        return None
    index = ContaminationIndex(n=gcfg.contamination_ngram)
    for spec in gcfg.contamination_paths:
        path = Path(spec)
        if not path.is_file():
            raise UserError(f"generate.contamination_paths: {spec} does not exist")
        with open(path, encoding="utf-8") as f:
            for line_no, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise UserError(f"{path}:{line_no}: not valid JSON ({e.msg})") from None
                for text in strings_in(row):
                    index.add(text)
    return index


class Selection:
    """The shards walked in order, dropping duplicates and contaminated dialogues, until `target`.

    The walk is incremental: a top-up round (more shards planned after a short one) goes on from
    the first shard not yet walked, with the duplicate index as the earlier shards left it, which
    is what walking every shard again from the start would give (each shard's verdicts depend only
    on the shards before it). Each shard's user-turn signatures are read from the file kept next
    to it when it has not changed since they were made, else computed and kept.
    """

    def __init__(self, run: RunDir, target: int, dups: DuplicateIndex | None,
                 contamination: ContaminationIndex | None):
        self.run, self.target, self.dups, self.contamination = run, target, dups, contamination
        self.shards: list[dict] = []  # per-shard records: rows taken from the file, ids skipped within them
        self.dropped: list[dict] = []  # the dropped dialogues with their reasons
        self.have = 0
        self.walked = 0

    def walk(self, planned: int) -> "Selection":
        while self.walked < planned and self.have < self.target:
            self._walk_shard(self.walked)
            self.walked += 1
        return self

    def _walk_shard(self, k: int) -> None:
        data = self.run.shard(k).read_bytes()
        sha256 = hashlib.sha256(data).hexdigest()
        # Split on b"\n" only: JSON escapes \r and \n in strings, but not U+2028, which str.splitlines splits on.
        rows = [json.loads(line) for line in data.split(b"\n") if line.strip()]
        check = None
        if self.dups is not None:
            signatures = shard_signatures(self.run.shard_signatures(k), sha256,
                                          [row["messages"][0]["content"] for row in rows])
            check = self.dups.checker(signatures)
        take, skip = 0, []
        for i, row in enumerate(rows):
            if self.have >= self.target:
                break
            take += 1
            text = " ".join(m["content"] for m in row["messages"])
            reason = "contaminated" if self.contamination and self.contamination.hits(text) else None
            if reason is None and check is not None:
                reason = check(i)
            if reason:
                skip.append(row["id"])
                self.dropped.append({**row, "reason": reason})
            else:
                self.have += 1
        self.shards.append(self.run.shard_record(k, take=take, skip=skip, rows=len(rows), sha256=sha256))


def write_shard(run: RunDir, shard: int, accepted: list[dict], rejected: list[dict]) -> None:
    # The rejected file first: the accepted shard's existence is what marks the shard done.
    atomic_write_jsonl(run.rejected_shard(shard), rejected)
    atomic_write_jsonl(run.shard(shard), accepted)


def run_stage(cfg: Config, run: RunDir, stage: Stage) -> dict:
    gcfg = cfg.generate
    model_path = resolve_model(cfg.model.path)
    rewrite = gcfg.strategy == "rewrite"
    task_data = task_data_for(cfg)
    task_rows = task_data.rows[: cfg.data.max_task_samples or None] if task_data else None

    run.remove_stale_writes("generate")  # writes a crash cut short; never read
    done = run.shards_on_disk()
    if done:
        log.info("generate: %d shards already on disk; generating only the missing ones", len(done))
    contamination = None if rewrite else contamination_index(gcfg)
    if rewrite:
        target = len(task_rows)
    elif gcfg.num_samples < 0:
        target = self_samples_needed(cfg, len(task_data.rows))
        log.info("generate: generate.num_samples=-1: %d self-dialogues (mix.self_ratio=%s x task rows + %d held out)",
                 target, cfg.mix.self_ratio, cfg.data.heldout_self)
    else:
        target = gcfg.num_samples
    planned = math.ceil(target / gcfg.shard_size)
    max_shards = gcfg.max_shards or 4 * max(planned, 1)
    sampling = {k: getattr(gcfg, k) for k in ("strategy", "temperature", "top_p", "top_k", "turns",
                                              "max_user_tokens", "max_assistant_tokens")}
    tokens, pool, in_flight_peak = 0, None, 0
    from sa_sft.cluster.ray_cluster import ray_session
    from sa_sft.engines.pool import EnginePool
    from sa_sft.generate.strategies import ShardProgram

    def call(actor, shard):
        rows = task_rows[shard * gcfg.shard_size:(shard + 1) * gcfg.shard_size] if rewrite else None
        return actor.run_program.remote(ShardProgram(cfg.seed, shard, gcfg.shard_size, sampling, rows))

    dups = DuplicateIndex(near_threshold=gcfg.near_dup_threshold) if gcfg.dedup and not rewrite else None
    selection = Selection(run, target, dups, contamination)
    shards_by_node: collections.Counter = collections.Counter()
    with ray_session(cfg.cluster.ray_address) as own_machine:
        try:
            on_disk = sum(len(read_jsonl(run.shard(k))) for k in done)
            bar = tqdm(total=target, initial=min(on_disk, target), unit="dlg", desc="generate", dynamic_ncols=True,
                       file=console.stream())
            started = time.time()
            while True:
                todo = [k for k in range(planned) if k not in done]
                if todo and pool is None:
                    log.info("generate: starting %d vLLM engine(s) for %s (%s)", gcfg.engines, model_path, gcfg.device)
                    pool = EnginePool(gcfg, str(model_path), cfg.model.trust_remote_code, cfg.seed,
                                      own_machine=own_machine,
                                      log=None if console.verbose() else run.output_log("generate"))
                    log.info("generate: engines ready: %s", pool.info)
                for result in (pool.map_work(todo, call) if todo else ()):
                    accepted, rejected = split_shard(result, None if rewrite else gcfg)
                    write_shard(run, result["shard"], accepted, rejected)
                    done.add(result["shard"])
                    shards_by_node[result["node"]] += 1
                    tokens += result["tokens"]
                    in_flight_peak = max(in_flight_peak, result["in_flight_peak"])
                    bar.update(min(len(accepted), target - bar.n))
                    bar.set_postfix(tok_s=f"{tokens / max(time.time() - started, 1e-9):.0f}")
                shards, have, dropped = selection.walk(planned).shards, selection.have, selection.dropped
                if have >= target:
                    break
                observed_yield = have / (planned * gcfg.shard_size)
                if planned >= max_shards:
                    raise UserError(
                        f"generate: only {have} of {target} dialogues passed the filters in {planned} shards "
                        f"(yield {observed_yield:.0%}); see {run.rejected_dir} and relax the filters "
                        f"(generate.drop_truncated, generate.min_turn_chars, generate.max_*_tokens) or raise generate.max_shards")
                extra = math.ceil((target - have) / max(observed_yield, MIN_YIELD) / gcfg.shard_size)
                log.info("generate: %d of %d accepted (yield %.0f%%); adding %d shard(s)",
                         have, target, 100 * observed_yield, extra)
                planned = min(planned + extra, max_shards)
            bar.close()
        finally:
            if pool is not None:
                pool.close()

    atomic_write_jsonl(run.selection_rejects, dropped)
    reasons = collections.Counter(row["reason"] for row in dropped)
    for k in range(planned):
        reasons.update(row["reason"] for row in read_jsonl(run.rejected_shard(k)))
    kept_original = collections.Counter(row.get("kept_original") for row in run.load_selected(shards)) if rewrite else {}
    log.info("generate: %d self-dialogues from %d shards in %.0f s (rejected: %s)",
             target, planned, time.time() - stage.started, dict(sorted(reasons.items())))
    return dict(
        num_samples=target,
        strategy=gcfg.strategy,
        **({"rewrites_kept_original": {k: v for k, v in kept_original.items() if k}} if rewrite else {}),
        num_generated=planned * gcfg.shard_size,
        shards=shards,
        rejected=dict(sorted(reasons.items())),
        tokens_generated_this_run=tokens,
        tokens_per_second=round(tokens / (time.time() - stage.started), 1) if tokens else None,
        engines=gcfg.engines,
        schedule=gcfg.schedule,
        engine_in_flight_peak_this_run=in_flight_peak,
        engine_restarts=pool.restarts if pool else 0,
        engine_nodes=sorted(engine["node"] for engine in pool.info) if pool else [],
        shards_by_node_this_run=dict(sorted(shards_by_node.items())),
    )
