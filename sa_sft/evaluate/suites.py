"""Evaluation suites: multiple choice by log-likelihood, generation with a checker, and the statistics.

A suite is named in `evaluate.suites` as a built-in (`mmlu`, `humaneval`, `ifeval`, `arithmetic`) or
`mc:PATH` / `gen:PATH` / `ifeval:PATH` for a JSONL file of one's own:
    mc:     {"question": str, "choices": [str, ...], "answer": index}
    gen:    {"messages": [...] (a final assistant turn is dropped) or "prompt": str, "answer": str,
             optional "checker": numeric | exact | label | python:FILE:FUNCTION (default exact;
          label: the same words, ignoring case and surrounding punctuation)}
    ifeval: IFEval's rows {"prompt", "instruction_id_list", "kwargs"}, checked by lm-eval's strict
            IFEval checker (sa_sft/data/ifeval.py)
Multiple choice is scored by likelihood (likelihood.py); generation and code suites are
answered greedily by vLLM (generation.py). The in-domain suite is the held-out task split,
checked by `evaluate.task_checker`. The statistics are in stats.py.
"""
import functools
import importlib.util
import json
import re
from dataclasses import dataclass
from pathlib import Path

from sa_sft.data import ifeval
from sa_sft.data.prepared import DERIVED, SOURCES, prepared_path
from sa_sft.data.task import BUILTIN_DIR
from sa_sft.errors import UserError
from sa_sft.io import sha256_file

# The built-in suites: the prepared data sets that are multiple choice, code or IFEval, and the
# committed generation suites.
BUILTIN_SUITES = {name: source["kind"] for name, source in {**SOURCES, **DERIVED}.items()
                  if source["kind"] in ("mc", "code", "ifeval")} | {"arithmetic": "gen"}
USER_KINDS = ("mc", "gen", "ifeval")
CHECKERS = ("numeric", "exact", "label")
# Where a HumanEval completion ends: the next top-level statement.
CODE_STOP = ["\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#"]


@dataclass
class Suite:
    name: str
    kind: str          # mc | gen | code | ifeval
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
            return f"checker must be numeric, exact, label or python:FILE:FUNCTION, got {checker!r}"
    if kind == "ifeval":
        return ifeval.row_problem(row)
    if kind == "code" and not all(isinstance(row.get(k), str) for k in ("prompt", "test", "entry_point")):
        return "needs prompt, test and entry_point strings"
    return None


def suite_file(spec: str) -> tuple[str, str, Path]:
    """(name, kind, file) of a suite named in evaluate.suites."""
    if spec in BUILTIN_SUITES:
        committed = BUILTIN_DIR / f"{spec}.jsonl"
        return spec, BUILTIN_SUITES[spec], committed if committed.exists() else prepared_path(spec)
    if ":" in spec and spec.split(":", 1)[0] in USER_KINDS:
        kind, raw = spec.split(":", 1)
        if not Path(raw).is_file():
            raise UserError(f"evaluate.suites: {raw} does not exist")
        return Path(raw).stem, kind, Path(raw)
    raise UserError(f"evaluate.suites: {spec!r} is neither a built-in ({', '.join(BUILTIN_SUITES)}) "
                    f"nor mc:PATH / gen:PATH / ifeval:PATH")


def suite_digests(specs: list[str]) -> dict[str, str]:
    """sha256 of each suite's file: scores cached for a suite are stale once its items change."""
    return {spec: sha256_file(suite_file(spec)[2]) for spec in specs if not spec.startswith("lm_eval:")}


def load_suite(spec: str, max_items: int) -> Suite:
    name, kind, path = suite_file(spec)
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


def label_text(text: str) -> str:
    return " ".join(text.strip().strip(".,;:!?\"'`*").lower().split())


def check(checker: str, completion: str, answer) -> bool:
    if checker.startswith("python:"):
        return bool(python_checker(checker)(completion, answer))
    if checker == "exact":
        return completion.strip() == str(answer).strip()
    if checker == "label":
        return label_text(completion) == label_text(str(answer))
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
