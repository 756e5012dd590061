"""The evaluate stage: what the fine-tuned model kept and what it learned, against the base.

Per model (base, final), each saved to eval/<model>.json as soon as it is computed, so a
rerun only scores what is missing:
  - `task_heldout`: mean NLL of the held-out task answers (in-domain);
  - `self_heldout`: mean NLL of held-out self-dialogues, the base model's own answers
    (reference-free retention);
  - general suites (`evaluate.suites`, e.g. mmlu): accuracy with a 95% Wilson interval;
  - `task_accuracy`: the held-out task prompts answered greedily by vLLM and checked
    (`evaluate.task_checker`), with generation and code suites in the same engine pool;
    every answer is kept in eval/<model>-generations.jsonl.
Between the two models: the per-token KL(base || final) on the self-dialogues
(eval/retention.json) and the weights' L2 drift per layer (eval/drift.json). The style gap,
the base model's NLL on task answers minus on its own answers, says how foreign the task's
style is to the model: the drift SA-SFT is meant to damp.
"""
import logging
import os
import time
from pathlib import Path

import torch

from sa_sft.config import Config, section_for_results
from sa_sft.evaluate.generation import complete_all, score_generated, task_suite
from sa_sft.evaluate.likelihood import kl_from_base, load_model, score_mc, score_mc_text, token_nll
from sa_sft.evaluate.suites import load_suite
from sa_sft.hardware import torch_dtype
from sa_sft.io import atomic_write_json, atomic_write_jsonl, read_json, sha256_file, sha256_json
from sa_sft.models import model_identity, resolve_model
from sa_sft.rundir import HELDOUT_SETS, RunDir, Stage

log = logging.getLogger("sa_sft.evaluate")

SUITES = ("task_heldout", "self_heldout")


def inputs(cfg: Config, run: RunDir) -> dict:
    return {"mix": run.fingerprint("mix"),
            "train": run.fingerprint("train") if run.finished("train") else None,
            "model": cfg.model.path, "evaluate": section_for_results(cfg.evaluate),
            "precision": cfg.train.precision}


def base_fingerprint(cfg: Config, run: RunDir) -> str:
    """The base model's scores depend only on the model, the suites and the held-out data, so runs
    that share those (the methods of `sa-sft compare`) can share eval/base.json."""
    return sha256_json({"model": model_identity(resolve_model(cfg.model.path)),
                        "evaluate": section_for_results(cfg.evaluate), "precision": cfg.train.precision,
                        "heldout": [sha256_file(run.heldout(s)) for s in HELDOUT_SETS if run.heldout(s).exists()]})


def cached(path: Path, fingerprint: str) -> dict | None:
    if path.exists() and read_json(path).get("fingerprint") == fingerprint:
        return read_json(path)
    return None


def score_model(name: str, path: Path, cfg: Config, heldout: dict, general: list, dtype, run: RunDir) -> dict:
    started = time.time()
    tokenizer, model = load_model(path, dtype, cfg.model.trust_remote_code, cfg.train.device)
    scores = score_likelihood(name, model, tokenizer, cfg, heldout, [s for s in general if s.kind == "mc"])
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the vLLM engines below need the memory
    generated = [s for s in general if s.kind in ("gen", "code")]
    if generated:
        log.info("evaluate: %s: answering %s with vLLM", name, ", ".join(f"{s.name} ({len(s.rows)})" for s in generated))
        texts = complete_all(cfg, path, tokenizer, generated)
        records = []
        for suite in generated:
            scores[suite.name], suite_records = score_generated(cfg, suite, texts[suite.name])
            records += suite_records
            log.info("evaluate: %s on %s: accuracy %.3f %s (n=%d)", name, suite.name, scores[suite.name]["value"],
                     scores[suite.name]["ci95"], scores[suite.name]["n"])
        atomic_write_jsonl(run.generations(name), records)
    return {"model": name, "path": str(path), "seconds": round(time.time() - started, 2), "suites": scores}


def score_likelihood(name: str, model, tokenizer, cfg: Config, heldout: dict, general: list) -> dict:
    scores = {}
    for suite, rows in heldout.items():
        if rows:
            scores[suite] = token_nll(model, tokenizer, [r["messages"] for r in rows],
                                      cfg.evaluate.max_seq_len, cfg.evaluate.batch_size)
            log.info("evaluate: %s on %s: mean NLL %.4f %s over %d tokens", name, suite,
                     scores[suite]["mean_nll"], scores[suite]["ci95"], scores[suite]["tokens"])
    for suite in general:
        scorer = score_mc_text if cfg.evaluate.mc_scoring == "text" else score_mc
        scores[suite.name] = scorer(model, tokenizer, suite.rows, cfg.evaluate.batch_size)
        log.info("evaluate: %s on %s: accuracy %.3f %s (n=%d, chance %.2f)", name, suite.name,
                 scores[suite.name]["value"], scores[suite.name]["ci95"], scores[suite.name]["n"],
                 scores[suite.name]["chance"])
    return scores


def run_stage(cfg: Config, run: RunDir, stage: Stage) -> dict:
    torch.set_num_threads(cfg.evaluate.threads or os.cpu_count() or 1)
    dtype = torch_dtype(cfg.train.precision)
    heldout = {"task_heldout": run.heldout_rows("task"), "self_heldout": run.heldout_rows("self")}
    general = [load_suite(spec, cfg.evaluate.max_items) for spec in cfg.evaluate.suites]
    in_domain = task_suite(cfg, heldout["task_heldout"])
    general = ([in_domain] if in_domain else []) + general
    models = {"base": resolve_model(cfg.model.path)}
    if run.finished("train"):
        models["final"] = run.final
    fingerprints = {"base": base_fingerprint(cfg, run), "final": stage.fingerprint}
    results = {}
    for name, path in models.items():
        out = run.scores(name)
        results[name] = cached(out, fingerprints[name])
        if results[name] is None:
            results[name] = {**score_model(name, path, cfg, heldout, general, dtype, run),
                             "fingerprint": fingerprints[name]}
            atomic_write_json(out, results[name])

    retention = cached(run.retention, stage.fingerprint)
    if retention is None and heldout["self_heldout"] and "final" in models:
        tokenizer, base = load_model(models["base"], dtype, cfg.model.trust_remote_code, cfg.train.device)
        _, final = load_model(models["final"], dtype, cfg.model.trust_remote_code, cfg.train.device)
        retention = {"fingerprint": stage.fingerprint,
                     **kl_from_base(base, final, tokenizer, [r["messages"] for r in heldout["self_heldout"]],
                                    cfg.evaluate.max_seq_len, max(1, cfg.evaluate.batch_size // 4))}
        del base, final
        atomic_write_json(run.retention, retention)
        log.info("evaluate: KL(base || final) on the base model's own answers: %.5f %s per token",
                 retention["mean_kl"], retention["ci95"])
    drift = None
    if cfg.evaluate.drift and "final" in models:
        from sa_sft.evaluate.drift import weight_drift
        drift = cached(run.drift, stage.fingerprint)
        if drift is None:
            drift = {"fingerprint": stage.fingerprint, **weight_drift(models["base"], models["final"])}
            atomic_write_json(run.drift, drift)
        log.info("evaluate: weights moved %.3g of their norm (L2 %.4g)", drift["relative"], drift["l2"])

    summary = {suite: {name: results[name]["suites"][suite]["mean_nll"] for name in results
                       if suite in results[name]["suites"]} for suite in SUITES}
    base_nll = results["base"]["suites"]
    style_gap = (round(base_nll["task_heldout"]["mean_nll"] - base_nll["self_heldout"]["mean_nll"], 5)
                 if "task_heldout" in base_nll and "self_heldout" in base_nll else None)
    accuracy = {s.name: {name: results[name]["suites"][s.name]["value"] for name in results} for s in general}
    files = [run.scores(name) for name in results] + ([run.retention] if retention else []) + [
        run.generations(name) for name in results if run.generations(name).exists()] + ([run.drift] if drift else [])
    return dict(mean_nll=summary, accuracy=accuracy, style_gap=style_gap,
                kl_base_final=retention["mean_kl"] if retention else None,
                drift_relative=drift["relative"] if drift else None, files=[run.relative(f) for f in files])
