"""Build the built-in demo task offline from the `reasoning-gym` PyPI package.

The demo task is GSM-style grade-school maths (reasoning-gym's `gsm_symbolic`): a
narrow in-domain task whose terse worked answers ("... #### 42") differ in style from
the model's own chat answers, which is exactly the setting where plain SFT forgets.

Run once by a maintainer (the output is committed; nothing is generated at run time):

    pip install reasoning-gym==0.1.25
    python scripts/make_demo_task.py sa_sft/data/builtin/gsm_symbolic.jsonl
"""
import argparse
import hashlib
import importlib.metadata
import json
from pathlib import Path


def build_rows(size: int, seed: int) -> list[dict]:
    import reasoning_gym

    dataset = reasoning_gym.create_dataset("gsm_symbolic", size=size, seed=seed)
    rows, seen = [], set()
    for entry in dataset:
        question = entry["question"].strip()
        if question in seen:
            continue
        seen.add(question)
        rows.append({
            "messages": [
                {"role": "user", "content": question},
                {"role": "assistant", "content": entry["metadata"]["answer_cot"].strip()},
            ],
            "answer": entry["answer"],
        })
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output", type=Path)
    parser.add_argument("--size", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=2602)
    args = parser.parse_args()
    rows = build_rows(args.size, args.seed)
    text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    args.output.write_text(text, encoding="utf-8")
    provenance = {
        "package": "reasoning-gym",
        "version": importlib.metadata.version("reasoning-gym"),
        "licence": "Apache-2.0",
        "generator": "gsm_symbolic",
        "size": args.size,
        "seed": args.seed,
        "rows": len(rows),
        "sha256": hashlib.sha256(text.encode()).hexdigest(),
    }
    args.output.with_suffix(".provenance.json").write_text(json.dumps(provenance, indent=2) + "\n")
    print(f"wrote {len(rows)} rows to {args.output}")


if __name__ == "__main__":
    main()
