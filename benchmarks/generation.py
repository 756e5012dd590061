"""Generation throughput: the sa-sft engine pool (vLLM in Ray actors) against plain
transformers `generate`, on the same self-dialogue prompts with the same sampling settings.

    .venv/bin/python benchmarks/generation.py [--dialogues 48] [--max-tokens 128] [--model default]

Measures, in one run on one machine:
  pool_1        one engine with every core (the default layout)
  pool_1_core   one engine on one core
  pool_2        two engines, one core each (data-parallel scaling: pool_2 / pool_1_core)
  pool_sorted   one engine with vLLM's own full-sort top-p (generate.fast_top_p=false)
  hf            transformers generate, batched, same dtype, same threads
Prints a table and writes benchmarks/results/generation.json. Engine start-up is timed
separately, not counted in tokens/s.
"""
import argparse
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sa_sft.config import load_config  # noqa: E402
from sa_sft.generate import strategies  # noqa: E402
from sa_sft.io import atomic_write_json  # noqa: E402
from sa_sft.models import resolve_model  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "generation.json"


def pool_run(cfg, model_path: Path, shards: int, shard_size: int, sampling: dict) -> dict:
    from sa_sft.cluster.ray_cluster import ray_session
    from sa_sft.engines.pool import EnginePool

    with ray_session(""):
        started = time.time()
        pool = EnginePool(cfg.generate, str(model_path), False, cfg.seed)
        startup = time.time() - started
        try:
            started = time.time()
            call = lambda actor, shard: actor.run_program.remote(
                strategies.ShardProgram(cfg.seed, shard, shard_size, sampling))
            results = list(pool.map_work(range(shards), call))
            seconds = time.time() - started
        finally:
            pool.close()
    tokens = sum(r["tokens"] for r in results)
    return {"tokens": tokens, "seconds": round(seconds, 2), "tokens_per_s": round(tokens / seconds, 1),
            "startup_seconds": round(startup, 1)}


@torch.no_grad()
def hf_run(model_path: Path, cfg, shards: int, shard_size: int, sampling: dict, batch_size: int,
           device: str = "cpu") -> dict:
    """The same two-turn self-dialogues with transformers: user turns, then answers, batched."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(os.cpu_count() or 1)
    tokenizer = AutoTokenizer.from_pretrained(model_path, padding_side="left")
    dtype = torch.bfloat16 if cfg.generate.dtype == "bfloat16" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).to(device).eval()
    gen = dict(do_sample=True, temperature=sampling["temperature"], top_p=sampling["top_p"],
               pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)

    def generate(prompts: list[str], max_new_tokens: int) -> tuple[list[str], int]:
        texts, tokens = [], 0
        for start in range(0, len(prompts), batch_size):
            batch = tokenizer(prompts[start:start + batch_size], return_tensors="pt", padding=True,
                              add_special_tokens=False).to(device)
            out = model.generate(**batch, max_new_tokens=max_new_tokens, **gen)[:, batch["input_ids"].shape[1]:]
            for row in out:
                ids = row.tolist()
                n = ids.index(tokenizer.eos_token_id) + 1 if tokenizer.eos_token_id in ids else len(ids)
                tokens += n
                texts.append(tokenizer.decode(ids[:n], skip_special_tokens=True).strip())
        return texts, tokens

    torch.manual_seed(cfg.seed)
    n = shards * shard_size
    started = time.time()
    prefix = strategies.user_turn_prefix(tokenizer, [])
    users, user_tokens = generate([prefix] * n, sampling["max_user_tokens"])
    answers_prompts = [strategies.assistant_prompt(tokenizer, [{"role": "user", "content": u}]) for u in users]
    _, answer_tokens = generate(answers_prompts, sampling["max_assistant_tokens"])
    seconds = time.time() - started
    tokens = user_tokens + answer_tokens
    return {"tokens": tokens, "seconds": round(seconds, 2), "tokens_per_s": round(tokens / seconds, 1),
            "batch_size": batch_size}


def summarize(results: dict) -> dict:
    """Headline ratios. The pool's number is its best layout on this machine: one engine per core."""
    tps = {name: r["tokens_per_s"] for name, r in results.items()}
    best = max(("pool_1", "pool_2"), key=tps.get)
    return {
        "pool_layout": best,
        "pool_tokens_per_s": tps[best],
        "hf_tokens_per_s": tps["hf"],
        "ratio_vs_hf": round(tps[best] / tps["hf"], 2),
        "ratio_vs_hf_one_engine_all_cores": round(tps["pool_1"] / tps["hf"], 2),
        "scaling_2_engines": round(tps["pool_2"] / tps["pool_1_core"], 2),
        "two_engines_vs_one_engine_all_cores": round(tps["pool_2"] / tps["pool_1"], 2),
        "fast_top_p_speedup": round(tps["pool_1"] / tps["pool_sorted"], 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--dialogues", type=int, default=48)
    parser.add_argument("--shard-size", type=int, default=24)
    parser.add_argument("--max-tokens", type=int, default=128, help="token cap of each answer")
    parser.add_argument("--hf-batch-size", type=int, default=48)
    args = parser.parse_args()

    model_path = resolve_model(args.model)
    shards = max(2, args.dialogues // args.shard_size)
    base = [f"model.path={args.model}", f"generate.max_assistant_tokens={args.max_tokens}",
            "generate.max_user_tokens=64"]
    cfg = load_config("demo", base)
    sampling = {k: getattr(cfg.generate, k) for k in ("strategy", "temperature", "top_p", "top_k", "turns",
                                                      "max_user_tokens", "max_assistant_tokens")}
    runs = {
        "pool_1": load_config("demo", base + ["generate.engines=1"]),
        "pool_1_core": load_config("demo", base + ["generate.engines=1", "generate.cpus_per_engine=1"]),
        "pool_2": load_config("demo", base + ["generate.engines=2"]),
        "pool_sorted": load_config("demo", base + ["generate.engines=1", "generate.fast_top_p=false"]),
    }
    results = {}
    for name, run_cfg in runs.items():
        results[name] = pool_run(run_cfg, model_path, shards, args.shard_size, sampling)
        print(f"{name}: {results[name]}", flush=True)
    results["hf"] = hf_run(model_path, cfg, shards, args.shard_size, sampling, args.hf_batch_size)
    print(f"hf: {results['hf']}", flush=True)

    report = {
        "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                    "dtype": cfg.generate.dtype, "torch": torch.__version__},
        "workload": {"model": str(model_path.name), "dialogues": shards * args.shard_size,
                     "max_user_tokens": sampling["max_user_tokens"], "max_assistant_tokens": args.max_tokens,
                     "temperature": sampling["temperature"], "top_p": sampling["top_p"]},
        "runs": results,
        **summarize(results),
    }
    atomic_write_json(RESULTS, report)
    print()
    print(f"{'run':<12} {'tokens':>8} {'seconds':>8} {'tokens/s':>9}")
    for name, r in results.items():
        print(f"{name:<12} {r['tokens']:>8} {r['seconds']:>8.1f} {r['tokens_per_s']:>9.1f}")
    print(f"\npool vs transformers: {report['ratio_vs_hf']}x   2 engines vs 1 (1 core each): {report['scaling_2_engines']}x   "
          f"fast top-p vs full sort: {report['fast_top_p_speedup']}x")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
