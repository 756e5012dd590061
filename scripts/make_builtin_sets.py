"""Build the built-in forgetting task and arithmetic suite offline from the `reasoning-gym` PyPI package.

  family_relationships  the `forgetting` config's task: a family tree in a few sentences, answered with
                        one word ("mother-in-law"). Terse labels in a rigid format, far from the chat
                        style of the model's own answers: where the paper says forgetting comes from.
  arithmetic            a general short-answer suite: sums and differences of two one-digit numbers
                        (`chain_sum`), checked numerically. No method trains on arithmetic.

Run once by a maintainer (the output is committed; nothing is generated at run time):

    pip install reasoning-gym==0.1.25
    python scripts/make_builtin_sets.py sa_sft/data/builtin
"""
import argparse
import hashlib
import importlib.metadata
import json
from pathlib import Path

SETS = {
    "family_relationships": {"generator": "family_relationships", "size": 1200, "seed": 2602, "config": {}},
    # One-digit sums and differences: two-digit ones were at the floor for the default model (8%).
    "arithmetic": {"generator": "chain_sum", "size": 1000, "seed": 2603,
                   "config": {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1}},
}


def build_rows(name: str) -> list[dict]:
    import reasoning_gym

    spec = SETS[name]
    dataset = reasoning_gym.create_dataset(spec["generator"], size=spec["size"], seed=spec["seed"], **spec["config"])
    rows, seen = [], set()
    for entry in dataset:
        question = entry["question"].strip()
        if question in seen:
            continue
        seen.add(question)
        answer = str(entry["answer"]).strip()
        if name == "arithmetic":
            rows.append({"prompt": question, "answer": answer, "checker": "numeric"})
        else:
            rows.append({"messages": [{"role": "user", "content": question},
                                      {"role": "assistant", "content": answer}]})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output_dir", type=Path)
    args = parser.parse_args()
    for name, spec in SETS.items():
        rows = build_rows(name)
        text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        out = args.output_dir / f"{name}.jsonl"
        out.write_text(text, encoding="utf-8")
        provenance = {"package": "reasoning-gym", "version": importlib.metadata.version("reasoning-gym"),
                      "licence": "Apache-2.0", **spec, "rows": len(rows),
                      "sha256": hashlib.sha256(text.encode()).hexdigest()}
        out.with_suffix(".provenance.json").write_text(json.dumps(provenance, indent=2) + "\n")
        print(f"wrote {len(rows)} rows to {out}")


if __name__ == "__main__":
    main()
