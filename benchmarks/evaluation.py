"""Likelihood scoring in the evaluate stage: the vocabulary projection only at scored positions
vs the full logits of every position (the straightforward way), on the same MMLU items.

Prints a table and writes benchmarks/results/evaluation.json. Both sides use the same batches
(sorted by length, `--batch-size`), the default model and fp32; the per-item NLLs must agree.
"""
import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("SA_SFT_CACHE_DIR", str(Path(__file__).resolve().parents[1] / ".cache"))

from sa_sft.chat import IGNORE_INDEX, pad_token_id, tokenize_conversation  # noqa: E402
from sa_sft.data.packing import collate  # noqa: E402
from sa_sft.evaluate.likelihood import load_model, token_nll  # noqa: E402
from sa_sft.evaluate.suites import load_suite  # noqa: E402
from sa_sft.io import atomic_write_json  # noqa: E402
from sa_sft.models import resolve_model  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "evaluation.json"


@torch.no_grad()
def full_logits_nll(model, tokenizer, conversations, batch_size) -> list[float]:
    rows = [tokenize_conversation(tokenizer, m, 1024) for m in conversations]
    rows = [{"input_ids": r.input_ids, "labels": r.labels} for r in rows]
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]["input_ids"]))
    out = [0.0] * len(rows)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        batch = collate([rows[i] for i in idx], pad_token_id(tokenizer), packed=False)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        targets = batch["labels"][:, 1:]
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), targets, ignore_index=IGNORE_INDEX,
                                                reduction="none")
        mask = targets != IGNORE_INDEX
        for j, i in enumerate(idx):
            out[i] = float(nll[j].sum()) / max(int(mask[j].sum()), 1)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--items", type=int, default=40, help="MMLU questions (x4 options)")
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    tokenizer, model = load_model(resolve_model("default"), torch.float32)
    rows = load_suite("mmlu", args.items).rows
    conversations = [[{"role": "user", "content": r["question"]}, {"role": "assistant", "content": c}]
                     for r in rows for c in r["choices"]]
    token_nll(model, tokenizer, conversations[:16], 1024, args.batch_size)  # warm-up
    t0 = time.time()
    scored = token_nll(model, tokenizer, conversations, 1024, args.batch_size)
    scored_s = time.time() - t0
    t0 = time.time()
    full = full_logits_nll(model, tokenizer, conversations, args.batch_size)
    full_s = time.time() - t0
    max_diff = max(abs(a - b) for a, b in zip(scored["per_sample_mean_nll"], full))
    report = {"items": args.items, "sequences": len(conversations), "batch_size": args.batch_size,
              "scored_positions_s": round(scored_s, 2), "full_logits_s": round(full_s, 2),
              "speedup": round(full_s / scored_s, 2), "max_abs_nll_difference": max_diff,
              "threads": torch.get_num_threads()}
    print(f"| scoring ({len(conversations)} sequences) | seconds | sequences/s |\n|---|---:|---:|")
    print(f"| full logits at every position | {full_s:.1f} | {len(conversations) / full_s:.2f} |")
    print(f"| projection at scored positions only | {scored_s:.1f} | {len(conversations) / scored_s:.2f} |")
    print(f"speedup {report['speedup']}x; largest per-sequence NLL difference {max_diff:.2e}")
    assert max_diff < 1e-3, "the two ways disagree"
    atomic_write_json(RESULTS, report)


if __name__ == "__main__":
    main()
