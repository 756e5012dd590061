"""Evaluation suites: multiple choice by log-likelihood, generation with a checker, and the statistics.

A suite is named in `evaluate.suites` as a built-in (`mmlu`) or `mc:PATH` / `gen:PATH` for a
JSONL file of one's own:
    mc:  {"question": str, "choices": [str, ...], "answer": index}
    gen: {"messages": [...] ending with the assistant's reference, or "prompt": str, "answer": str}
The in-domain suite is always the held-out task split, generated with vLLM and checked.
"""
import json
import math
import random
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from sa_sft.chat import render
from sa_sft.errors import UserError

BUILTIN_SUITES = {"mmlu": "mc"}
LETTERS = "ABCDEFGHIJ"


@dataclass
class Suite:
    name: str
    kind: str          # mc | gen
    rows: list[dict]
    checker: str = "numeric"


def load_suite(spec: str, max_items: int) -> Suite:
    from sa_sft.prepared_data import prepared_path

    if spec in BUILTIN_SUITES:
        name, kind, path = spec, BUILTIN_SUITES[spec], prepared_path(spec)
    elif ":" in spec and spec.split(":", 1)[0] in ("mc", "gen"):
        kind, raw = spec.split(":", 1)
        path = Path(raw)
        name = path.stem
        if not path.is_file():
            raise UserError(f"evaluate.suites: {raw} does not exist")
    else:
        raise UserError(f"evaluate.suites: {spec!r} is neither a built-in ({', '.join(BUILTIN_SUITES)}) "
                        f"nor mc:PATH / gen:PATH")
    rows = []
    for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if kind == "mc" and not (isinstance(row.get("choices"), list) and isinstance(row.get("answer"), int)
                                     and 0 <= row["answer"] < len(row["choices"]) and row.get("question")):
                raise ValueError("needs question, choices (list) and answer (index into choices)")
            if kind == "gen" and "answer" not in row:
                raise ValueError("needs answer")
        except ValueError as e:
            raise UserError(f"{path}:{line_no}: {e}") from None
        rows.append(row)
    if not rows:
        raise UserError(f"evaluate.suites: {path} has no items")
    return Suite(name=name, kind=kind, rows=rows[:max_items] if max_items else rows)


def mc_prompt(tokenizer, row: dict) -> str:
    options = "\n".join(f"{LETTERS[i]}. {choice}" for i, choice in enumerate(row["choices"]))
    question = f"{row['question']}\n{options}\nAnswer with the letter of the correct option."
    return render(tokenizer, [{"role": "user", "content": question}], add_generation_prompt=True)


@torch.no_grad()
def score_mc(model, tokenizer, rows: list[dict], batch_size: int) -> dict:
    """Accuracy: the option letter the model finds most likely as its answer's first token."""
    from sa_sft.evaluate.nll import pad_token_id

    letter_ids = [tokenizer(LETTERS[i], add_special_tokens=False)["input_ids"][0] for i in range(len(LETTERS))]
    correct = []
    pad_id = pad_token_id(tokenizer)
    for start in range(0, len(rows), batch_size):
        batch = rows[start:start + batch_size]
        encoded = [tokenizer(mc_prompt(tokenizer, r), add_special_tokens=False)["input_ids"] for r in batch]
        width = max(map(len, encoded))
        ids = torch.full((len(batch), width), pad_id)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for j, e in enumerate(encoded):  # left padding: the next-token logits sit in the last column
            ids[j, width - len(e):] = torch.tensor(e)
            mask[j, width - len(e):] = 1
        position_ids = (mask.cumsum(1) - 1).clamp(min=0)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids).logits[:, -1].float()
        for j, row in enumerate(batch):
            options = logits[j, letter_ids[:len(row["choices"])]]
            correct.append(int(options.argmax()) == row["answer"])
    return accuracy(correct, chance=sum(1 / len(r["choices"]) for r in rows) / len(rows))


@torch.no_grad()
def score_mc_text(model, tokenizer, rows: list[dict], batch_size: int) -> dict:
    """Accuracy: the option whose text, as the assistant's answer, has the highest mean token
    log-likelihood (cloze scoring; small models often pick letters near chance but texts well)."""
    from sa_sft.evaluate.nll import token_nll

    pairs = [(i, c) for i, row in enumerate(rows) for c in range(len(row["choices"]))]
    conversations = [[{"role": "user", "content": rows[i]["question"]},
                      {"role": "assistant", "content": rows[i]["choices"][c]}] for i, c in pairs]
    means = [-nll for nll in token_nll(model, tokenizer, conversations, 1024, batch_size)["per_sample_mean_nll"]]
    best: dict[int, tuple[float, int]] = {}
    for (i, c), m in zip(pairs, means):
        if i not in best or m > best[i][0]:
            best[i] = (m, c)
    correct = [best[i][1] == row["answer"] for i, row in enumerate(rows)]
    return accuracy(correct, chance=sum(1 / len(r["choices"]) for r in rows) / len(rows))


def accuracy(correct: list[bool], chance: float | None = None) -> dict:
    n, k = len(correct), sum(correct)
    low, high = wilson_interval(k, n)
    return {"metric": "accuracy", "value": round(k / max(n, 1), 4), "ci95": [round(low, 4), round(high, 4)],
            "n": n, **({"chance": round(chance, 4)} if chance is not None else {}),
            "per_item": [int(c) for c in correct]}


def wilson_interval(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    if n == 0:
        return 0.0, 0.0
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def bootstrap_ratio_ci(sums: list[float], counts: list[int], seed: int = 0, resamples: int = 1000) -> list[float]:
    """95% interval of sum(sums)/sum(counts) over samples resampled with replacement."""
    if not sums:
        return [0.0, 0.0]
    rng = random.Random(seed)
    n = len(sums)
    stats = []
    for _ in range(resamples):
        idx = [rng.randrange(n) for _ in range(n)]
        stats.append(sum(sums[i] for i in idx) / max(sum(counts[i] for i in idx), 1))
    stats.sort()
    return [round(stats[int(0.025 * resamples)], 5), round(stats[int(0.975 * resamples) - 1], 5)]


NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def extract_number(text: str) -> float | None:
    """The answer after '####' if the model wrote one, else the last number in the text."""
    tail = text.split("####")[-1]
    found = NUMBER.findall(tail) or NUMBER.findall(text)
    if not found:
        return None
    try:
        return float(found[-1].replace(",", ""))
    except ValueError:
        return None


def check(checker: str, completion: str, answer) -> bool:
    if checker == "exact":
        return completion.strip() == str(answer).strip()
    value = extract_number(completion)
    try:
        return value is not None and abs(value - float(str(answer).replace(",", ""))) < 1e-6
    except ValueError:
        return False


def gen_prompt_messages(row: dict) -> list[dict]:
    if "messages" in row:
        messages = row["messages"]
        return messages[:-1] if messages and messages[-1]["role"] == "assistant" else messages
    return [{"role": "user", "content": row["prompt"]}]
