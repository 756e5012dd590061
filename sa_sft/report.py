"""report.json and report.md, rebuilt from a run directory's manifests and eval files alone."""
from pathlib import Path

from sa_sft.errors import UserError
from sa_sft.io import atomic_write_json, atomic_write_text, read_json, read_jsonl
from sa_sft.stage import STAGES


def collect(run_dir: Path) -> dict:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"{run_dir} is not a run directory")
    manifests = {s: read_json(run_dir / s / "manifest.json") for s in STAGES
                 if (run_dir / s / "manifest.json").exists()}
    if not manifests:
        raise UserError(f"{run_dir} has no finished stage (no */manifest.json)")
    report = {"run_dir": str(run_dir.resolve()),
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
    if "train" in manifests:
        t = manifests["train"]
        metrics = read_jsonl(run_dir / "train" / "metrics.jsonl")
        report["train"] = {"steps": t["steps"], "num_params": t["num_params"], "zero_stage": t["zero_stage"],
                           "ranks": t["ranks"], "first_loss": t["first_loss"], "final_loss": t["final_loss"],
                           "tokens_per_s": t["tokens_per_s"], "logged_steps": len(metrics)}
    if "evaluate" in manifests:
        evals = {name: read_json(run_dir / "eval" / f"{name}.json") for name in ("base", "final")
                 if (run_dir / "eval" / f"{name}.json").exists()}
        report["eval"] = {}
        for suite in sorted({s for e in evals.values() for s in e["suites"]}):
            row = {name: e["suites"][suite]["mean_nll"] for name, e in evals.items() if suite in e["suites"]}
            if "base" in row and "final" in row:
                row["delta"] = round(row["final"] - row["base"], 5)
            report["eval"][suite] = {"metric": "mean_nll", **row}
    config = run_dir / "config.yaml"
    if config.exists():
        report["config"] = str(config)
    return report


def render_markdown(report: dict) -> str:
    lines = ["# sa-sft run report", "", f"Run directory: `{report['run_dir']}`", "", "## Stages", "",
             "| stage | seconds | resumed |", "|---|---:|---|"]
    lines += [f"| {s} | {v['seconds']:.1f} | {v['resumed']} |" for s, v in report["stages"].items()]
    if "mix" in report:
        c = report["mix"]["counts"]
        lines += ["", "## Training data", "", "| source | samples | tokens | loss tokens |", "|---|---:|---:|---:|"]
        lines += [f"| {src} | {v['samples']} | {v['tokens']} | {v['loss_tokens']} |" for src, v in c.items()]
        lines += ["", f"Realized self-dialogues per task sample: {report['mix']['realized_self_ratio']}"]
    if "train" in report:
        t = report["train"]
        lines += ["", "## Training", "", f"{t['steps']} steps, ZeRO-{t['zero_stage']} on {t['ranks']} ranks, "
                  f"{t['num_params'] / 1e6:.1f}M parameters; loss {t['first_loss']} -> {t['final_loss']}; "
                  f"{t['tokens_per_s']} tokens/s"]
    if report.get("eval"):
        lines += ["", "## Evaluation (mean token NLL on assistant turns; lower is better)", "",
                  "| suite | base | final | change |", "|---|---:|---:|---:|"]
        for suite, r in report["eval"].items():
            lines.append(f"| {suite} | {r.get('base', '')} | {r.get('final', '')} | {r.get('delta', '')} |")
        lines += ["", "`task_heldout` falling means the task was learned; `self_heldout` rising means the model "
                  "drifted from its own original behaviour (forgetting)."]
    return "\n".join(lines) + "\n"


def write_report(run_dir: Path) -> dict:
    report = collect(run_dir)
    atomic_write_json(Path(run_dir) / "report.json", report)
    atomic_write_text(Path(run_dir) / "report.md", render_markdown(report))
    return report
