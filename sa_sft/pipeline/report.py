"""report.json and report.md, rebuilt from a run directory's manifests and eval files alone."""
from sa_sft.errors import UserError
from sa_sft.io import atomic_write_json, atomic_write_text, read_json, read_jsonl
from sa_sft.pipeline.stages import STAGE_NAMES
from sa_sft.rundir import RunDir

MODELS = ("base", "final")


def collect(run: RunDir) -> dict:
    if not run.root.is_dir():
        raise UserError(f"{run.root} is not a run directory")
    manifests = {s: run.manifest(s) for s in STAGE_NAMES if run.finished(s)}
    if not manifests:
        raise UserError(f"{run.root} has no finished stage (no stage manifest)")
    report = {"run_dir": str(run.root.resolve()),
              "stages": {s: {"seconds": m["seconds"], "resumed": m["resumed"], "finished_at": m["finished_at"]}
                         for s, m in manifests.items()}}
    if "generate" in manifests:
        g = manifests["generate"]
        report["generate"] = {"num_samples": g["num_samples"], "rejected": g["rejected"],
                              "tokens_per_second": g["tokens_per_second"], "engines": g["engines"]}
    if "mix" in manifests:
        m = manifests["mix"]
        report["mix"] = {"counts": m["counts"], "realized_self_ratio": m["realized_self_ratio"],
                         "heldout": m["heldout"], "truncated": m["truncated"], "dropped": m["dropped"]}
    if "train" in manifests and "interpolated" in manifests["train"]:
        report["train"] = {"steps": 0, "interpolated": manifests["train"]["interpolated"]}
    elif "train" in manifests:
        t = manifests["train"]
        metrics = read_jsonl(run.metrics)
        report["train"] = {"steps": t["steps"], "num_params": t["num_params"], "zero_stage": t["zero_stage"],
                           "ranks": t["ranks"], "first_loss": t["first_loss"], "final_loss": t["final_loss"],
                           "tokens_per_s": t["tokens_per_s"], "logged_steps": len(metrics)}
    if "evaluate" in manifests:
        evals = {name: read_json(run.scores(name)) for name in MODELS if run.scores(name).exists()}
        report["eval"] = {}
        for suite in sorted({s for e in evals.values() for s in e["suites"]}):
            scored = {name: e["suites"][suite] for name, e in evals.items() if suite in e["suites"]}
            metric = "accuracy" if "value" in next(iter(scored.values())) else "mean_nll"
            row = {name: v["value" if metric == "accuracy" else "mean_nll"] for name, v in scored.items()}
            if "base" in row and "final" in row:
                row["delta"] = round(row["final"] - row["base"], 5)
            row["ci95"] = {name: v.get("ci95") for name, v in scored.items()}
            if metric == "accuracy":
                row["chance"] = next(iter(scored.values())).get("chance")
            report["eval"][suite] = {"metric": metric, **row}
        e = manifests["evaluate"]
        report["retention"] = {"kl_base_final": e.get("kl_base_final"), "style_gap": e.get("style_gap")}
        if run.retention.exists():
            report["retention"]["kl_ci95"] = read_json(run.retention)["ci95"]
        if run.drift.exists():
            drift = read_json(run.drift)
            report["drift"] = {"relative": drift["relative"], "l2": drift["l2"],
                               "per_group": {g: v["relative"] for g, v in drift["per_group"].items()}}
    if run.config.exists():
        report["config"] = str(run.config)
    return report


def render_markdown(report: dict, run: RunDir) -> str:
    lines = ["# sa-sft run report", "", f"Run directory: `{report['run_dir']}`", "", "## Stages", "",
             "| stage | seconds | resumed |", "|---|---:|---|"]
    lines += [f"| {s} | {v['seconds']:.1f} | {v['resumed']} |" for s, v in report["stages"].items()]
    if "mix" in report:
        c = report["mix"]["counts"]
        lines += ["", "## Training data", "", "| source | samples | tokens | loss tokens |", "|---|---:|---:|---:|"]
        lines += [f"| {src} | {v['samples']} | {v['tokens']} | {v['loss_tokens']} |" for src, v in c.items()]
        lines += ["", f"Realized self-dialogues per task sample: {report['mix']['realized_self_ratio']}"]
    if "interpolated" in report.get("train", {}):
        w = report["train"]["interpolated"]
        lines += ["", "## Training", "", f"None: WiSE-FT, {w['alpha']} x `{w['fine_tuned']}` + "
                  f"{round(1 - w['alpha'], 4)} x the base model"]
    elif "train" in report:
        t = report["train"]
        lines += ["", "## Training", "", f"{t['steps']} steps, ZeRO-{t['zero_stage']} on {t['ranks']} ranks, "
                  f"{t['num_params'] / 1e6:.1f}M parameters; loss {t['first_loss']} -> {t['final_loss']}; "
                  f"{t['tokens_per_s']} tokens/s"]
    if report.get("eval"):
        lines += ["", "## Evaluation", "", "Mean token NLL on assistant turns (lower is better) or accuracy "
                  "(higher is better); 95% intervals in brackets (bootstrap over samples / Wilson).", "",
                  "| suite | metric | base | final | change |", "|---|---|---:|---:|---:|"]
        for suite, r in report["eval"].items():
            ci = r.get("ci95", {})
            cell = lambda name: f"{r[name]} {fmt_ci(ci.get(name))}" if name in r else ""
            chance = f" (chance {r['chance']})" if r.get("chance") is not None else ""
            lines.append(f"| {suite} | {r['metric']}{chance} | {cell('base')} | {cell('final')} | {r.get('delta', '')} |")
        lines += ["", "`task_heldout` falling means the task was learned; `self_heldout` rising means the model "
                  "drifted from its own original behaviour (forgetting)."]
    if report.get("retention", {}).get("kl_base_final") is not None:
        r = report["retention"]
        lines += ["", "## Drift", "", f"- KL(base || final) per token on the base model's own answers: "
                  f"{r['kl_base_final']} {fmt_ci(r.get('kl_ci95'))}",
                  f"- Style gap (base NLL on task answers minus on its own answers): {r['style_gap']}"]
    if "drift" in report:
        d = report["drift"]
        lines += [f"- Weights moved {d['relative']:.3g} of their norm (L2 {d['l2']:.4g}); per layer: "
                  f"`{run.relative(run.plot('drift'))}`, values in `{run.relative(run.drift)}`"]
    return "\n".join(lines) + "\n"


def fmt_ci(ci) -> str:
    return f"[{ci[0]}, {ci[1]}]" if ci else ""


def write_report(run: RunDir) -> dict:
    from sa_sft.plots import write_run_plots

    report = collect(run)
    report["plots"] = [run.relative(path) for path in write_run_plots(run, report)]
    atomic_write_json(run.report_json, report)
    atomic_write_text(run.report_md, render_markdown(report, run))
    return report
