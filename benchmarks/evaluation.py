"""Likelihood scoring in the evaluate stage: on the vLLM engines (what sa-sft does) against transformers'
batched forward pass (what a user would write instead), on the same MMLU option texts, in one run.

Prints a table and writes benchmarks/results/evaluation.json: sequences/s for each, the engine's
start-up apart, and the largest per-sequence difference in mean NLL (both fp32 here; the suite's
agreement test holds it under 2e-3 nats per token). Records the CPU flags.
"""
import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("SA_SFT_CACHE_DIR", str(Path(__file__).resolve().parents[1] / ".cache"))

from sa_sft.chat import pad_token_id  # noqa: E402
from sa_sft.config import load_config  # noqa: E402
from sa_sft.data.packing import collate  # noqa: E402
from sa_sft.evaluate import scoring  # noqa: E402
from sa_sft.evaluate.suites import load_suite  # noqa: E402
from sa_sft.io import atomic_write_json  # noqa: E402
from sa_sft.models import resolve_model  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "evaluation.json"


@torch.no_grad()
def transformers_logprobs(model, tokenizer, requests: scoring.Requests, batch_size: int) -> list[list[float]]:
    """Batched by length, right-padded: log-softmax over the vocabulary, the scored tokens picked."""
    order = sorted(range(len(requests.sequences)), key=lambda i: len(requests.sequences[i]))
    out = [None] * len(order)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        rows = [{"input_ids": requests.sequences[i], "labels": requests.sequences[i]} for i in idx]
        batch = collate(rows, pad_token_id(tokenizer), packed=False)
        logp = torch.log_softmax(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float(), -1)
        for j, i in enumerate(idx):
            ids = requests.sequences[i]
            out[i] = [float(logp[j, p - 1, ids[p]]) for p in requests.positions[i]]
    return out


def cpu_flags() -> str:
    out = subprocess.run("grep -o 'avx512_bf16\\|amx_bf16\\|avx2' /proc/cpuinfo | sort -u", shell=True,
                         capture_output=True, text=True).stdout.split()
    return ",".join(out)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--items", type=int, default=40, help="MMLU questions (x4 options)")
    parser.add_argument("--batch-size", type=int, default=16, help="transformers' batch")
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sa_sft.cluster.ray_cluster import ray_session
    from sa_sft.evaluate.stage import Engines

    path = resolve_model("default")
    cfg = load_config("demo", ["generate.dtype=float32", "evaluate.max_seq_len=1024"])
    tokenizer = AutoTokenizer.from_pretrained(path)
    rows = load_suite("mmlu", args.items).rows
    requests = scoring.mc_text_requests(tokenizer, rows, 1024)

    with ray_session("") as own_machine:
        t0 = time.time()
        engines = Engines(cfg, path, own_machine)
        startup = time.time() - t0
        try:
            engines.score(scoring.Requests(requests.sequences[:16], requests.positions[:16]))  # warm-up
            t0 = time.time()
            ours = engines.score(requests)
            ours_s = time.time() - t0
        finally:
            engines.close()

    torch.set_num_threads(os.cpu_count() or 1)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    transformers_logprobs(model, tokenizer, scoring.Requests(requests.sequences[:16], requests.positions[:16]), 16)
    t0 = time.time()
    theirs = transformers_logprobs(model, tokenizer, requests, args.batch_size)
    theirs_s = time.time() - t0

    mean = lambda lps: [sum(lp) / max(len(lp), 1) for lp in lps]
    max_diff = max(abs(a - b) for a, b in zip(mean(ours), mean(theirs)))
    n = len(requests.sequences)
    report = {"items": args.items, "sequences": n, "dtype": "float32", "cpu_flags": cpu_flags(),
              "threads": torch.get_num_threads(), "engine_startup_s": round(startup, 1),
              "engines_s": round(ours_s, 2), "transformers_s": round(theirs_s, 2),
              "engines_over_transformers": round(theirs_s / ours_s, 2), "max_abs_mean_nll_difference": max_diff,
              "accuracy_engines": scoring.mc_text_result(rows, ours)["value"],
              "accuracy_transformers": scoring.mc_text_result(rows, theirs)["value"]}
    print(f"| scoring {n} option texts ({report['cpu_flags']}, fp32) | seconds | sequences/s |\n|---|---:|---:|")
    print(f"| transformers, batch {args.batch_size} | {theirs_s:.1f} | {n / theirs_s:.2f} |")
    print(f"| vLLM engine (sa-sft), start-up {startup:.0f} s apart | {ours_s:.1f} | {n / ours_s:.2f} |")
    print(f"engines / transformers: {report['engines_over_transformers']}x; largest per-sequence difference "
          f"{max_diff:.2e} nats/token; accuracy {report['accuracy_engines']} vs {report['accuracy_transformers']}")
    atomic_write_json(RESULTS, report)
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
