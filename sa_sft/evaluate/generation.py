"""Generation and code suites: greedy answers from vLLM engines on Ray, then checked.

The in-domain suite is built from the held-out task rows: the prompt is the conversation up
to the last assistant turn, the reference is what that turn's checker extracts (for
`numeric`, the number after `####` or the last number). Code suites (HumanEval) complete the
raw prompt and run the completion with the suite's tests in the sandbox.
"""
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tqdm import tqdm

from sa_sft.chat import render
from sa_sft.config import Config
from sa_sft.evaluate.stats import accuracy
from sa_sft.evaluate.suites import CODE_STOP, Suite, check, extract_number, gen_prompt_messages

log = logging.getLogger("sa_sft.evaluate")

TASK_SUITE = "task_accuracy"
BUILTIN_CHECKERS = {"builtin:gsm_symbolic": "numeric", "builtin:family_relationships": "label"}


def task_checker(cfg: Config) -> str:
    checker = cfg.evaluate.task_checker
    return BUILTIN_CHECKERS.get(cfg.data.task_path, "none") if checker == "auto" else checker


def task_suite(cfg: Config, heldout_rows: list[dict]) -> Suite | None:
    """The held-out task rows as a generation suite, or None when there is no checker for them."""
    checker = task_checker(cfg)
    if checker == "none" or not heldout_rows:
        return None
    rows = []
    for row in heldout_rows:
        reference = row["messages"][-1]["content"]
        answer = extract_number(reference) if checker == "numeric" else reference
        if answer is not None:
            rows.append({"messages": row["messages"], "answer": answer, "checker": checker})
    if len(rows) < len(heldout_rows):
        log.warning("evaluate: %d held-out task answers have no number to check; scoring the other %d",
                    len(heldout_rows) - len(rows), len(rows))
    return Suite(name=TASK_SUITE, kind="gen", rows=rows) if rows else None


def prompt_text(tokenizer, suite: Suite, row: dict) -> str:
    if suite.kind == "code":
        return row["prompt"]
    return render(tokenizer, gen_prompt_messages(row), add_generation_prompt=True)


def score_generated(cfg: Config, suite: Suite, completions: list[str]) -> tuple[dict, list[dict]]:
    """(accuracy with its interval, one record per item for eval/<model>-generations.jsonl)."""
    if suite.kind == "code":
        from sa_sft.evaluate.sandbox import run_python

        programs = [f"{row['prompt']}{text}\n\n{row['test']}\n\ncheck({row['entry_point']})\n"
                    for row, text in zip(suite.rows, completions)]
        with ThreadPoolExecutor(max(1, os.cpu_count() or 1)) as workers:
            outcomes = list(workers.map(lambda p: run_python(p, cfg.evaluate.code_timeout_s), programs))
        correct = [o.passed for o in outcomes]
        reasons = [o.reason for o in outcomes]
    elif suite.kind == "ifeval":
        from sa_sft.data.ifeval import follows

        followed = [follows(row, text) for row, text in zip(suite.rows, completions)]
        correct = [all(f) for f in followed]
        reasons = ["passed" if all(f) else "not followed: " + ", ".join(
            i for i, ok in zip(row["instruction_id_list"], f) if not ok) for row, f in zip(suite.rows, followed)]
    else:
        correct = [check(row.get("checker", "exact"), text, row["answer"]) for row, text in zip(suite.rows, completions)]
        reasons = ["passed" if c else "wrong" for c in correct]
    records = [{"suite": suite.name, "item": i, "completion": text, "correct": c, "reason": r}
               for i, (text, c, r) in enumerate(zip(completions, correct, reasons))]
    return accuracy(correct), records
