"""The generate stage: the frozen base model writes self-dialogues into resumable shards.

Shard k is a pure function of (run seed, k). Shards are generated until the accepted
dialogues in shard order reach `generate.num_samples`; the first that many are used, so
the result is the same whatever the number of engines or interruptions.
"""
import logging
import math
import time
from pathlib import Path

from tqdm import tqdm

from sa_sft.config import Config, section_for_results
from sa_sft.errors import UserError
from sa_sft.generate.filters import mark_truncated, rejection_reason
from sa_sft.io import atomic_write_jsonl, read_json, read_jsonl, sha256_file
from sa_sft.models import cache_dir, model_identity, resolve_model
from sa_sft.stage import open_stage

log = logging.getLogger("sa_sft.generate")

MIN_YIELD = 0.05


def shard_path(stage_dir: Path, shard: int) -> Path:
    return stage_dir / "shards" / f"shard-{shard:05d}.jsonl"


def generate_inputs(cfg: Config, model_path: Path) -> dict:
    return {"model": model_identity(model_path), "seed": cfg.seed,
            "generate": section_for_results(cfg.generate)}


def split_shard(result: dict, cfg) -> tuple[list[dict], list[dict]]:
    accepted, rejected = [], []
    for dialogue in result["dialogues"]:
        reason = rejection_reason(dialogue, cfg.min_turn_chars, cfg.drop_truncated, cfg.keep_truncated_answers)
        if reason:
            rejected.append({**dialogue, "reason": reason})
        else:
            accepted.append(mark_truncated(dialogue))
    return accepted, rejected


def write_shard(stage_dir: Path, shard: int, accepted: list[dict], rejected: list[dict]) -> None:
    # The rejected file first: the accepted shard's existence is what marks the shard done.
    atomic_write_jsonl(stage_dir / "rejected" / f"shard-{shard:05d}.jsonl", rejected)
    atomic_write_jsonl(shard_path(stage_dir, shard), accepted)


def run_generate(cfg: Config, run_dir: Path, overwrite: bool = False) -> dict:
    gcfg = cfg.generate
    model_path = resolve_model(cfg.model.path)
    stage = open_stage(run_dir, "generate", generate_inputs(cfg, model_path), overwrite)
    if stage is None:
        return read_json(run_dir / "generate" / "manifest.json")

    accepted_per_shard: dict[int, int] = {}
    for path in sorted((stage.dir / "shards").glob("shard-*.jsonl")):
        accepted_per_shard[int(path.stem.split("-")[1])] = len(read_jsonl(path))
    if accepted_per_shard:
        log.info("generate: %d shards already on disk; generating only the missing ones", len(accepted_per_shard))

    target = gcfg.num_samples
    planned = math.ceil(target / gcfg.shard_size)
    max_shards = gcfg.max_shards or 4 * max(planned, 1)
    counters = {"tokens": 0, "engine_seconds": 0.0, "shards_generated": 0, "rejected": {}}
    pool = None
    from sa_sft.generate.pool import EnginePool, ray_session

    with ray_session(gcfg.ray_address):
        try:
            bar = tqdm(total=target, unit="dlg", desc="generate", dynamic_ncols=True)
            bar.update(min(target, sum(accepted_per_shard.values())))
            started = time.time()
            while True:
                todo = [k for k in range(planned) if k not in accepted_per_shard]
                if todo and pool is None:
                    log.info("generate: starting %d vLLM engine(s) for %s (%s)", gcfg.engines, model_path, gcfg.device)
                    pool = EnginePool(gcfg, str(model_path), cfg.model.trust_remote_code, cfg.seed, str(cache_dir()))
                    log.info("generate: engines ready: %s", pool.info)
                sampling = {k: getattr(gcfg, k) for k in ("temperature", "top_p", "top_k", "turns",
                                                          "max_user_tokens", "max_assistant_tokens")}
                call = lambda actor, shard: actor.generate_shard.remote(shard, cfg.seed, gcfg.shard_size, sampling)
                for result in (pool.map_shards(todo, call) if todo else ()):
                    accepted, rejected = split_shard(result, gcfg)
                    write_shard(stage.dir, result["shard"], accepted, rejected)
                    accepted_per_shard[result["shard"]] = len(accepted)
                    counters["tokens"] += result["tokens"]
                    counters["engine_seconds"] += result["seconds"]
                    counters["shards_generated"] += 1
                    for r in rejected:
                        counters["rejected"][r["reason"]] = counters["rejected"].get(r["reason"], 0) + 1
                    bar.update(min(len(accepted), target - bar.n))
                    bar.set_postfix(tok_s=f"{counters['tokens'] / max(time.time() - started, 1e-9):.0f}")
                have = sum(accepted_per_shard[k] for k in range(planned))
                if have >= target:
                    break
                observed_yield = have / (planned * gcfg.shard_size)
                extra = math.ceil((target - have) / max(observed_yield, MIN_YIELD) / gcfg.shard_size)
                if planned >= max_shards:
                    raise UserError(
                        f"generate: only {have} of {target} dialogues passed the filters in {planned} shards "
                        f"(yield {observed_yield:.0%}); see {stage.dir / 'rejected'} and relax the filters "
                        f"(generate.drop_truncated, generate.min_turn_chars, generate.max_*_tokens) or raise generate.max_shards")
                log.info("generate: %d of %d accepted (yield %.0f%%); adding %d shard(s)",
                         have, target, 100 * observed_yield, extra)
                planned = min(planned + extra, max_shards)
            bar.close()
        finally:
            if pool is not None:
                pool.close()

    shards, remaining = [], target
    for k in range(planned):
        path = shard_path(stage.dir, k)
        use = min(accepted_per_shard[k], remaining)
        shards.append({"file": str(path.relative_to(stage.dir)), "accepted": accepted_per_shard[k],
                       "used": use, "sha256": sha256_file(path)})
        remaining -= use
    wall = time.time() - stage.started
    manifest = stage.finish(
        num_samples=target,
        num_generated=planned * gcfg.shard_size,
        shards=shards,
        rejected=counters["rejected"],
        tokens_generated_this_run=counters["tokens"],
        tokens_per_second=round(counters["tokens"] / wall, 1) if counters["tokens"] else None,
        engines=gcfg.engines,
        engine_restarts=pool.restarts if pool else 0,
    )
    log.info("generate: %d self-dialogues from %d shards in %.0f s", target, planned, manifest["seconds"])
    return manifest


def load_self_dialogues(run_dir: Path) -> list[dict]:
    """The accepted self-dialogues the manifest lists, checked against their recorded hashes."""
    stage_dir = Path(run_dir) / "generate"
    manifest = read_json(stage_dir / "manifest.json")
    dialogues = []
    for shard in manifest["shards"]:
        path = stage_dir / shard["file"]
        if sha256_file(path) != shard["sha256"]:
            raise UserError(f"{path} changed since generation (hash mismatch); rerun generate with --overwrite")
        dialogues += read_jsonl(path)[: shard["used"]]
    return dialogues
