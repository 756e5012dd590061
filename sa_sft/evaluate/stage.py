"""The evaluate stage: what the fine-tuned model kept and what it learned, against the base.

Each model (base, final) is served by a pool of vLLM engines (`generate.engines`,
`generate.tensor_parallel_size`, `generate.device`: the generation engines) that scores and
answers everything (scoring.py), so no process ever holds a whole model. Per model, saved to
eval/<model>.json as soon as it is computed, so a rerun only scores what is missing:
  - `task_heldout`: mean NLL of the held-out task answers (in-domain);
  - `self_heldout`: mean NLL of held-out self-dialogues, the base model's own answers
    (reference-free retention; drawn from what SA-SFT trains on, so it favours SA-SFT);
  - `chat_heldout` (`evaluate.chat_heldout` > 0): mean NLL of the base model's own answers to
    held-out ShareGPT prompts, which no method trains on (retention fair to every method), with
    KL(base || model) on the same answers;
  - general suites (`evaluate.suites`, e.g. mmlu): accuracy with a 95% Wilson interval;
  - `task_accuracy`: the held-out task prompts answered greedily and checked
    (`evaluate.task_checker`), with generation and code suites; every answer is kept in
    eval/<model>-generations.jsonl.
Between the two models: KL(base || final) per token on answers the base model samples for the
held-out self-dialogues' prompts (eval/retention.json), and the weights' L2 drift per layer
(eval/drift.json, streamed tensor by tensor). The style gap, the base model's NLL on task answers
minus on its own answers, says how foreign the task's style is to the model: the drift SA-SFT is
meant to damp.
"""
import logging
import time
from pathlib import Path

from tqdm import tqdm

from sa_sft import console
from sa_sft.config import Config, section_for_results
from sa_sft.evaluate import harness, scoring
from sa_sft.evaluate.generation import prompt_text, score_generated, task_suite
from sa_sft.evaluate.suites import CODE_STOP, Suite, load_suite, suite_digests
from sa_sft.io import atomic_write_json, atomic_write_jsonl, read_json, read_jsonl, sha256_file, sha256_json
from sa_sft.models import model_identity, resolve_model
from sa_sft.rundir import HELDOUT_SETS, RunDir, Stage

log = logging.getLogger("sa_sft.evaluate")

SUITES = ("task_heldout", "self_heldout", "chat_heldout")
CHAT_SUITE = "chat_heldout"
CHUNK = 32  # sequences per engine call: small enough to spread over the engines, large enough to batch


def inputs(cfg: Config, run: RunDir) -> dict:
    return {"mix": run.fingerprint("mix"),
            "train": run.fingerprint("train") if run.finished("train") else None,
            "model": cfg.model.path, "evaluate": section_for_results(cfg.evaluate),
            "suites": suite_digests(cfg.evaluate.suites), **harness.fingerprint(cfg), "dtype": cfg.generate.dtype}


def base_fingerprint(cfg: Config, run: RunDir) -> str:
    """The base model's scores depend only on the model, the suites and the held-out data, so runs
    that share those (the methods of `sa-sft compare`) can share eval/base.json."""
    return sha256_json({"model": model_identity(resolve_model(cfg.model.path)), "seed": cfg.seed,
                        "evaluate": section_for_results(cfg.evaluate), "dtype": cfg.generate.dtype,
                        "suites": suite_digests(cfg.evaluate.suites), **harness.fingerprint(cfg),
                        "heldout": [sha256_file(run.heldout(s)) for s in HELDOUT_SETS if run.heldout(s).exists()]})


def chat_fingerprint(cfg: Config) -> str:
    """The base model's answers to the held-out chat prompts depend on the model and how they are
    sampled, not on the run's data, so every method of `sa-sft compare` shares them."""
    from sa_sft.data.prepared import prepare

    return sha256_json({"model": model_identity(resolve_model(cfg.model.path)), "seed": cfg.seed,
                        "prompts": cfg.evaluate.chat_heldout, "source": sha256_file(prepare("chat_heldout")),
                        "max_seq_len": cfg.evaluate.max_seq_len, "answer_tokens": cfg.generate.max_assistant_tokens,
                        "dtype": cfg.generate.dtype})


def cached(path: Path, fingerprint: str) -> dict | None:
    if path.exists() and read_json(path).get("fingerprint") == fingerprint:
        return read_json(path)
    return None


class Engines:
    """One model's engine pool for the evaluation: every request goes out in chunks over its engines."""

    def __init__(self, cfg: Config, model_path: Path, own_machine: bool, log: Path | None = None):
        self.cfg, self.own_machine, self.log = cfg, own_machine, log
        self.pool, self.path = None, None
        self.serve(model_path)

    def serve(self, model_path: Path) -> None:
        """Engines for `model_path`: new ones when the checkpoint changes. (vLLM's in-place
        `reload_weights` would spare the start, but measured here on a model with tied embeddings it
        left the scores 0.06 nats off the new checkpoint's, so each checkpoint gets fresh engines.)"""
        from sa_sft.engines.pool import EnginePool

        if Path(model_path) == self.path:
            return
        self.close()
        cfg = self.cfg
        self.path, self.name = Path(model_path), Path(model_path).name
        self.pool = EnginePool(cfg.generate, str(model_path), cfg.model.trust_remote_code, cfg.seed,
                               own_machine=self.own_machine,
                               max_model_len=cfg.evaluate.max_seq_len + cfg.evaluate.max_new_tokens, log=self.log)

    def _map(self, what: str, count: int, call) -> list[dict]:
        results = [None] * ((count + CHUNK - 1) // CHUNK)
        with tqdm(total=count, unit=what, desc=f"evaluate {self.name}", dynamic_ncols=True, leave=False,
                  file=console.stream()) as bar:
            for result in self.pool.map_work(range(len(results)), call):
                results[result["tag"]] = result
                bar.update(min(CHUNK, count - result["tag"] * CHUNK))
        return results

    def score(self, requests: scoring.Requests) -> list[list[float]]:
        seqs, pos = requests.sequences, requests.positions
        call = lambda actor, k: actor.score.remote(seqs[k * CHUNK:(k + 1) * CHUNK], pos[k * CHUNK:(k + 1) * CHUNK], tag=k)
        return [lp for r in self._map("seq", len(seqs), call) for lp in r["logprobs"]]

    def sample(self, prompts: list[list[int]], max_tokens: int, seeds: list[int]) -> tuple[list, list]:
        call = lambda actor, k: actor.sample.remote(prompts[k * CHUNK:(k + 1) * CHUNK], max_tokens,
                                                    seeds[k * CHUNK:(k + 1) * CHUNK], tag=k)
        results = self._map("answer", len(prompts), call)
        return [t for r in results for t in r["tokens"]], [lp for r in results for lp in r["logprobs"]]

    def complete(self, prompts: list[str], max_tokens: int, stop: list[str]) -> list[str]:
        call = lambda actor, k: actor.complete.remote(prompts[k * CHUNK:(k + 1) * CHUNK], max_tokens, stop, tag=k)
        return [text for r in self._map("answer", len(prompts), call) for text in r["texts"]]

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()
            self.pool = None


def score_model(name: str, engines: Engines, tokenizer, cfg: Config, heldout: dict, general: list[Suite],
                run: RunDir, chat: dict | None = None) -> dict:
    """Every suite for one model on its engines."""
    started = time.time()
    ecfg = cfg.evaluate
    scores = {}
    for suite, rows in heldout.items():
        if rows:
            requests = scoring.nll_requests(tokenizer, [r["messages"] for r in rows], ecfg.max_seq_len)
            scores[suite] = scoring.nll_result(engines.score(requests))
            log.info("evaluate: %s on %s: mean NLL %.4f %s over %d tokens", name, suite,
                     scores[suite]["mean_nll"], scores[suite]["ci95"], scores[suite]["tokens"])
    if chat:
        # The base model's answers are scored by every model the same way (prompt log-probabilities),
        # the base included, so the paired change compares like with like.
        logprobs = engines.score(scoring.kl_requests(chat["prompts"], chat["answers"]))
        scores[CHAT_SUITE] = scoring.nll_result(logprobs)
        if name != "base":
            scores[CHAT_SUITE]["kl_from_base"] = scoring.kl_result(chat["logprobs"], logprobs)
        log.info("evaluate: %s on %s: mean NLL %.4f %s over %d tokens", name, CHAT_SUITE,
                 scores[CHAT_SUITE]["mean_nll"], scores[CHAT_SUITE]["ci95"], scores[CHAT_SUITE]["tokens"])
    for suite in (s for s in general if s.kind == "mc"):
        if ecfg.mc_scoring == "text":
            requests = scoring.mc_text_requests(tokenizer, suite.rows, ecfg.max_seq_len)
            scores[suite.name] = scoring.mc_text_result(suite.rows, engines.score(requests))
        else:
            requests = scoring.mc_letter_requests(tokenizer, suite.rows, ecfg.max_seq_len)
            scores[suite.name] = scoring.mc_letter_result(suite.rows, engines.score(requests))
        log.info("evaluate: %s on %s: accuracy %.3f %s (n=%d, chance %.2f)", name, suite.name,
                 scores[suite.name]["value"], scores[suite.name]["ci95"], scores[suite.name]["n"],
                 scores[suite.name]["chance"])
    records = []
    for suite in (s for s in general if s.kind in ("gen", "code", "ifeval")):
        prompts = [prompt_text(tokenizer, suite, row) for row in suite.rows]
        texts = engines.complete(prompts, ecfg.max_new_tokens, CODE_STOP if suite.kind == "code" else [])
        scores[suite.name], suite_records = score_generated(cfg, suite, texts)
        records += suite_records
        log.info("evaluate: %s on %s: accuracy %.3f %s (n=%d)", name, suite.name, scores[suite.name]["value"],
                 scores[suite.name]["ci95"], scores[suite.name]["n"])
    if records:
        atomic_write_jsonl(run.generations(name), records)
    return {"model": name, "seconds": round(time.time() - started, 2), "suites": scores}


def kl_samples(engines: Engines, tokenizer, cfg: Config, rows: list[dict]) -> dict:
    """The base model's own answers to the held-out self-dialogues' prompts, with their log-probabilities."""
    prompts, seeds = scoring.kl_prompts(tokenizer, [r["messages"] for r in rows], cfg.evaluate.max_seq_len,
                                        cfg.generate.max_assistant_tokens, cfg.seed)
    answers, logprobs = engines.sample(prompts, cfg.generate.max_assistant_tokens, seeds)
    return {"prompts": prompts, "answers": answers, "logprobs": logprobs}


def chat_samples(engines: Engines, tokenizer, cfg: Config) -> dict:
    """The base model's own answers (sampled at T=1, seeded) to the first `evaluate.chat_heldout`
    held-out ShareGPT prompts."""
    from sa_sft.data.prepared import prepare

    path = prepare("chat_heldout")
    rows = read_jsonl(path)
    # The first half of the prepared prompts; the second half are the `ifeval` suite's.
    prompts = [r["prompt"] for r in rows[:len(rows) // 2]][:cfg.evaluate.chat_heldout]
    contexts, seeds = scoring.chat_prompts(tokenizer, prompts, cfg.evaluate.max_seq_len,
                                           cfg.generate.max_assistant_tokens, cfg.seed)
    answers, logprobs = engines.sample(contexts, cfg.generate.max_assistant_tokens, seeds)
    return {"prompts": contexts, "answers": answers, "logprobs": logprobs, "source": str(path)}


def run_stage(cfg: Config, run: RunDir, stage: Stage) -> dict:
    from transformers import AutoTokenizer

    from sa_sft.cluster.ray_cluster import ray_session

    heldout = {"task_heldout": run.heldout_rows("task"), "self_heldout": run.heldout_rows("self")}
    general = [load_suite(spec, cfg.evaluate.max_items) for spec in cfg.evaluate.suites if not harness.is_harness(spec)]
    in_domain = task_suite(cfg, heldout["task_heldout"])
    general = ([in_domain] if in_domain else []) + general
    models = {"base": resolve_model(cfg.model.path)}
    if run.finished("train"):
        models["final"] = run.final
    fingerprints = {"base": base_fingerprint(cfg, run), "final": stage.fingerprint}
    tokenizer = AutoTokenizer.from_pretrained(models["base"], trust_remote_code=cfg.model.trust_remote_code)
    results = {name: cached(run.scores(name), fingerprints[name]) for name in models}
    samples = (read_jsonl(run.kl_samples)[0] if run.kl_samples.exists() else {})
    if samples.get("fingerprint") != fingerprints["base"]:
        samples = {}
    chat = read_jsonl(run.chat_samples)[0] if run.chat_samples.exists() else {}
    if not cfg.evaluate.chat_heldout or chat.get("fingerprint") != chat_fingerprint(cfg):
        chat = {}
    needs_chat = cfg.evaluate.chat_heldout > 0 and not chat
    if needs_chat:
        results = {name: None for name in models}  # every model is scored on the same answers
    retention = cached(run.retention, stage.fingerprint)
    want_kl = bool(heldout["self_heldout"]) and "final" in models
    needs_samples = want_kl and not samples
    needs_kl = want_kl and retention is None
    todo = [name for name in models if results[name] is None or (name == "base" and (needs_samples or needs_chat))
            or (name == "final" and needs_kl)]
    if todo:
        with ray_session(cfg.cluster.ray_address) as own_machine:
            log.info("evaluate: starting %d vLLM engine(s) for %s", cfg.generate.engines, ", ".join(todo))
            engines = Engines(cfg, models[todo[0]], own_machine,
                              None if console.verbose() else run.output_log("evaluate"))
            try:
                for name in todo:
                    engines.serve(models[name])
                    if name == "base" and needs_chat:
                        chat = {"fingerprint": chat_fingerprint(cfg), **chat_samples(engines, tokenizer, cfg)}
                        atomic_write_jsonl(run.chat_samples, [chat])
                    if results[name] is None:
                        results[name] = {**score_model(name, engines, tokenizer, cfg, heldout, general, run,
                                                       chat or None),
                                         "path": str(models[name]), "fingerprint": fingerprints[name]}
                        atomic_write_json(run.scores(name), results[name])
                    if name == "base" and needs_samples:
                        samples = {"fingerprint": fingerprints["base"],
                                   **kl_samples(engines, tokenizer, cfg, heldout["self_heldout"])}
                        atomic_write_jsonl(run.kl_samples, [samples])
                    if name == "final" and needs_kl:
                        final_logprobs = engines.score(scoring.kl_requests(samples["prompts"], samples["answers"]))
                        retention = {"fingerprint": stage.fingerprint,
                                     **scoring.kl_result(samples["logprobs"], final_logprobs)}
                        atomic_write_json(run.retention, retention)
                        log.info("evaluate: KL(base || final) per token on the base model's own answers: %.5f %s",
                                 retention["mean_kl"], retention["ci95"])
            finally:
                engines.close()
    # lm_eval:TASK suites, once our engines are gone (its back end loads the model itself); a model's
    # scores file is rewritten as each one's are added, so an interrupted stage resumes from there.
    lm_eval_specs = harness.harness_specs(cfg.evaluate.suites)
    for name in models:
        missing = [s for s in lm_eval_specs if s not in results[name]["suites"]]
        if missing:
            log.info("evaluate: %s on %s with lm-evaluation-harness (%s back end)", name, ", ".join(missing),
                     harness.backend(cfg))
            results[name]["suites"].update(harness.evaluate_model(cfg, models[name], missing))
            atomic_write_json(run.scores(name), results[name])
            for spec in missing:
                got = results[name]["suites"][spec]
                log.info("evaluate: %s on %s: %s %.3f (stderr %s, n=%s)", name, spec, got["lm_eval"]["metric"],
                         got["value"], got["stderr"], got["n"])
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
    accuracy = {s: {name: results[name]["suites"][s]["value"] for name in results}
                for s in [g.name for g in general] + lm_eval_specs}
    files = [run.scores(name) for name in results] + ([run.retention] if retention else []) + (
        [run.chat_samples] if chat else []) + [
        run.generations(name) for name in results if run.generations(name).exists()] + ([run.drift] if drift else [])
    outputs = dict(mean_nll=summary, accuracy=accuracy, style_gap=style_gap,
                   kl_base_final=retention["mean_kl"] if retention else None,
                   drift_relative=drift["relative"] if drift else None, files=[run.relative(f) for f in files])
    from sa_sft.trackers import log_evaluation
    log_evaluation(cfg, run, outputs)  # train.report_to: the summary into the run's tracker runs
    return outputs
