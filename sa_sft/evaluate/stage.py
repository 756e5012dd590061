"""The evaluate stage: the base and the fine-tuned model scored on the held-out data.

Suites: `task_heldout` (held-out task rows: in-domain) and `self_heldout` (held-out
self-dialogues: how well the model still matches its own original behaviour). Each model's
results land in eval/<model>.json as soon as they are computed, so a rerun only scores
what is missing.
"""
import logging
import os
import time
from pathlib import Path

import torch

from sa_sft.config import Config, section_for_results
from sa_sft.evaluate.nll import load_model, token_nll
from sa_sft.io import atomic_write_json, read_json, read_jsonl
from sa_sft.models import resolve_model
from sa_sft.stage import open_stage, upstream_fingerprint

log = logging.getLogger("sa_sft.evaluate")

SUITES = ("task_heldout", "self_heldout")


def evaluate_inputs(cfg: Config, run_dir: Path) -> dict:
    return {"mix": upstream_fingerprint(run_dir, "mix"), "train": upstream_fingerprint(run_dir, "train"),
            "model": cfg.model.path, "evaluate": section_for_results(cfg.evaluate),
            "precision": cfg.train.precision}


def run_evaluate(cfg: Config, run_dir: Path, overwrite: bool = False) -> dict:
    stage = open_stage(run_dir, "evaluate", evaluate_inputs(cfg, run_dir), overwrite)
    if stage is None:
        return read_json(run_dir / "evaluate" / "manifest.json")
    torch.set_num_threads(cfg.evaluate.threads or os.cpu_count() or 1)
    dtype = torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32
    suites = {"task_heldout": read_jsonl(run_dir / "mix" / "heldout" / "task.jsonl"),
              "self_heldout": read_jsonl(run_dir / "mix" / "heldout" / "self.jsonl")}
    models = {"base": resolve_model(cfg.model.path), "final": run_dir / "train" / "final"}
    eval_dir = run_dir / "eval"
    results = {}
    for name, path in models.items():
        out = eval_dir / f"{name}.json"
        if out.exists() and read_json(out).get("fingerprint") == stage.fingerprint:
            results[name] = read_json(out)
            continue
        started = time.time()
        tokenizer, model = load_model(path, dtype, cfg.model.trust_remote_code)
        scores = {}
        for suite, rows in suites.items():
            if not rows:
                continue
            scores[suite] = token_nll(model, tokenizer, [r["messages"] for r in rows],
                                      cfg.evaluate.max_seq_len, cfg.evaluate.batch_size)
            log.info("evaluate: %s on %s: mean NLL %.4f over %d tokens", name, suite,
                     scores[suite]["mean_nll"], scores[suite]["tokens"])
        del model
        results[name] = {"model": name, "path": str(path), "fingerprint": stage.fingerprint,
                         "seconds": round(time.time() - started, 2), "suites": scores}
        atomic_write_json(out, results[name])
    summary = {suite: {name: results[name]["suites"][suite]["mean_nll"] for name in results
                       if suite in results[name]["suites"]} for suite in SUITES}
    return stage.finish(mean_nll=summary, files=[f"eval/{name}.json" for name in results])
