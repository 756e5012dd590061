"""Evaluation suites: multiple choice by log-likelihood, generation with a checker, and the statistics.

A suite is named in `evaluate.suites` as a built-in (`mmlu`, `humaneval`) or `mc:PATH` /
`gen:PATH` for a JSONL file of one's own:
    mc:  {"question": str, "choices": [str, ...], "answer": index}
    gen: {"messages": [...] (a final assistant turn is dropped) or "prompt": str, "answer": str,
          optional "checker": numeric | exact | python:FILE:FUNCTION (default exact)}
Generation and code suites are answered greedily by vLLM (generation.py). The in-domain suite
is the held-out task split, checked by `evaluate.task_checker`.
"""
import functools
import importlib.util
import json
import math
import random
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from sa_sft.chat import render
from sa_sft.errors import UserError

BUILTIN_SUITES = {"mmlu": "mc", "humaneval": "code"}
LETTERS = "ABCDEFGHIJ"
CHECKERS = ("numeric", "exact")
# Where a HumanEval completion ends: the next top-level statement.
CODE_STOP = ["\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#"]


@dataclass
class Suite:
    name: str
    kind: str          # mc | gen | code
    rows: list[dict]


def row_problem(kind: str, row) -> str | None:
    if not isinstance(row, dict):
        return "each line must be a JSON object"
    if kind == "mc" and not (isinstance(row.get("choices"), list) and isinstance(row.get("answer"), int)
                             and 0 <= row["answer"] < len(row["choices"]) and row.get("question")):
        return "needs question, choices (list) and answer (index into choices)"
    if kind == "gen":
        if "answer" not in row or not (isinstance(row.get("prompt"), str) or isinstance(row.get("messages"), list)):
            return "needs answer and a prompt (string) or messages (list)"
        checker = row.get("checker", "exact")
        if checker not in CHECKERS and not str(checker).startswith("python:"):
            return f"checker must be numeric, exact or python:FILE:FUNCTION, got {checker!r}"
    if kind == "code" and not all(isinstance(row.get(k), str) for k in ("prompt", "test", "entry_point")):
        return "needs prompt, test and entry_point strings"
    return None


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
        except ValueError as e:
            raise UserError(f"{path}:{line_no}: not valid JSON ({e})") from None
        problem = row_problem(kind, row)
        if problem:
            raise UserError(f"{path}:{line_no}: {problem}")
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
        ids, mask, position_ids = ids.to(model.device), mask.to(model.device), position_ids.to(model.device)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids).logits[:, -1].float().cpu()
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


def paired_bootstrap_delta(sums_a: list[float], sums_b: list[float], counts: list[int], seed: int = 0,
                           resamples: int = 2000) -> dict:
    """ratio(b) - ratio(a) over the same items, with a 95% interval from resampling items jointly.

    Pairing removes the spread between items, which both models share, so it separates two
    models scored on the same questions far better than comparing their separate intervals."""
    n = len(counts)
    if n == 0:
        return {"delta": 0.0, "ci95": [0.0, 0.0], "n": 0}
    ratio = lambda sums, idx: sum(sums[i] for i in idx) / max(sum(counts[i] for i in idx), 1)
    rng = random.Random(seed)
    stats = []
    for _ in range(resamples):
        idx = [rng.randrange(n) for _ in range(n)]
        stats.append(ratio(sums_b, idx) - ratio(sums_a, idx))
    stats.sort()
    everything = range(n)
    return {"delta": round(ratio(sums_b, everything) - ratio(sums_a, everything), 5),
            "ci95": [round(stats[int(0.025 * resamples)], 5), round(stats[int(0.975 * resamples) - 1], 5)], "n": n}


def item_sums(result: dict) -> tuple[list[float], list[int]]:
    """Per-item (sum, count) of a suite result: correct/1 for accuracy, NLL sum/tokens for NLL."""
    if "per_item" in result:
        return [float(c) for c in result["per_item"]], [1] * len(result["per_item"])
    counts = result["per_sample_tokens"]
    return [m * c for m, c in zip(result["per_sample_mean_nll"], counts)], counts


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


@functools.cache
def python_checker(spec: str):
    """`python:FILE:FUNCTION`: the user's own scorer, called as FUNCTION(completion, answer) -> bool."""
    file, _, function = spec.removeprefix("python:").rpartition(":")
    if not file or not function:
        raise UserError(f"checker {spec!r} must look like python:FILE:FUNCTION")
    module_spec = importlib.util.spec_from_file_location("sa_sft_user_checker", file)
    if module_spec is None:
        raise UserError(f"checker {spec!r}: cannot load {file}")
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except FileNotFoundError:
        raise UserError(f"checker {spec!r}: {file} does not exist") from None
    if not callable(getattr(module, function, None)):
        raise UserError(f"checker {spec!r}: {file} has no function {function}")
    return getattr(module, function)


def check(checker: str, completion: str, answer) -> bool:
    if checker.startswith("python:"):
        return bool(python_checker(checker)(completion, answer))
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
