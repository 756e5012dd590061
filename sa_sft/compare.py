"""`sa-sft compare`: the same task, schedule and seed under each method the paper compares, each a
normal run directory under output_dir, then one comparison report.

Methods are config presets (overrides), not code paths:
    base       no training: the model as it was
    task_only  plain SFT on the task data (mix.self_ratio=0)
    sa_sft     task data + the model's own self-dialogues at the configured lambda
    freeze     task-only SFT with the bottom half of the layers frozen
    external   task data + general chats from PyPI (sharegpt) at the same ratio, instead of self-dialogues
Generation runs once (the sa_sft run's), and every run uses its held-out self-dialogues for
the retention scores; the base model is scored once and its scores reused.
"""
import json
import logging
import shutil
from pathlib import Path

from sa_sft.config import Config, load_config
from sa_sft.evaluate.suites import item_sums, paired_bootstrap_delta
from sa_sft.errors import UserError
from sa_sft.io import atomic_write_json, atomic_write_text, read_json
from sa_sft.models import resolve_model

log = logging.getLogger("sa_sft.compare")

METHODS = ("base", "task_only", "sa_sft", "freeze", "external")


def method_overrides(method: str, cfg: Config) -> list[str]:
    ratio = cfg.mix.self_ratio or 1.0
    if method in ("base", "task_only"):
        return ["mix.self_ratio=0"]
    if method == "sa_sft":
        return [f"mix.self_ratio={ratio}"]
    if method == "freeze":
        layers = json.loads((resolve_model(cfg.model.path) / "config.json").read_text())["num_hidden_layers"]
        return ["mix.self_ratio=0", f"train.freeze_layers={layers // 2}"]
    if method == "external":
        return ["mix.self_ratio=0", f"mix.external_ratio={ratio}",
                f"data.external_path={cfg.data.external_path or 'builtin:sharegpt'}"]
    raise UserError(f"compare: unknown method {method!r} (methods: {', '.join(METHODS)})")


def run_compare(config: str, overrides: list[str], methods: list[str], overwrite: bool = False) -> dict:
    from sa_sft.pipeline import run_stages

    cfg = load_config(config, overrides)
    root = Path(cfg.output_dir)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise UserError(f"compare: unknown method(s) {', '.join(unknown)} (methods: {', '.join(METHODS)})")
    # sa_sft first: its generation is the one every other run reuses.
    order = sorted(methods, key=lambda m: m != "sa_sft")
    configs = {m: load_config(config, [*overrides, *method_overrides(m, cfg), f"output_dir={root / m}"])
               for m in order}
    for m in order:
        run_dir = root / m
        if m != order[0] and not (run_dir / "generate").exists() and (root / order[0] / "generate" / "manifest.json").exists():
            run_dir.mkdir(parents=True, exist_ok=True)
            shutil.copytree(root / order[0] / "generate", run_dir / "generate")
        for name in ("base.json", "base-generations.jsonl"):
            shared = root / order[0] / "eval" / name
            if m != order[0] and not (run_dir / "eval" / name).exists() and shared.exists():
                (run_dir / "eval").mkdir(parents=True, exist_ok=True)
                shutil.copyfile(shared, run_dir / "eval" / name)
        stages = ["generate", "mix", "evaluate"] if m == "base" else ["generate", "mix", "train", "evaluate"]
        log.info("compare: == %s == (%s)", m, " ".join(method_overrides(m, cfg)))
        run_stages(configs[m], stages, overwrite)
    return write_comparison([root / m for m in methods], root)


def method_row(run_dir: Path) -> dict:
    report = read_json(run_dir / "report.json")
    evals = report.get("eval", {})
    trained = "train" in report
    side = "final" if trained else "base"
    row = {"method": run_dir.name, "run_dir": str(run_dir), "scores": {}}
    for suite, r in evals.items():
        if side in r:
            row["scores"][suite] = {"metric": r["metric"], "value": r[side], "ci95": r.get("ci95", {}).get(side),
                                    "base": r.get("base")}
    row["kl_base_final"] = report.get("retention", {}).get("kl_base_final") if trained else 0.0
    row["drift_relative"] = report.get("drift", {}).get("relative") if trained else 0.0
    row["drift_per_group"] = report.get("drift", {}).get("per_group", {}) if trained else {}
    row["final_loss"] = report.get("train", {}).get("final_loss")
    return row


def scored_items(run_dir: Path, model: str) -> dict:
    path = run_dir / "eval" / f"{model}.json"
    return read_json(path)["suites"] if path.exists() else {}


def paired_changes(run_dirs: list[Path]) -> dict:
    """Per trained method and suite, final minus base on the same items (paired bootstrap), and
    sa_sft minus task_only where both ran: the question `sa-sft compare` exists to answer."""
    finals = {d.name: scored_items(d, "final") for d in run_dirs if (d / "train" / "manifest.json").exists()}
    base = next((scored_items(d, "base") for d in run_dirs if scored_items(d, "base")), {})
    changes = {"vs_base": {}, "sa_sft_vs_task_only": {}}
    for method, suites in finals.items():
        for suite, result in suites.items():
            if suite in base and len(item_sums(base[suite])[1]) == len(item_sums(result)[1]):
                a, counts = item_sums(base[suite])
                changes["vs_base"].setdefault(method, {})[suite] = paired_bootstrap_delta(a, item_sums(result)[0], counts)
    if "sa_sft" in finals and "task_only" in finals:
        for suite, result in finals["sa_sft"].items():
            other = finals["task_only"].get(suite)
            if other and len(item_sums(other)[1]) == len(item_sums(result)[1]):
                a, counts = item_sums(other)
                changes["sa_sft_vs_task_only"][suite] = paired_bootstrap_delta(a, item_sums(result)[0], counts)
    return changes


def write_comparison(run_dirs: list[Path], out_dir: Path) -> dict:
    from sa_sft.plots import write_compare_plots

    missing = [str(d) for d in run_dirs if not (Path(d) / "report.json").exists()]
    if missing:
        raise UserError(f"compare: no report.json in {', '.join(missing)}; run those first")
    rows = [method_row(Path(d)) for d in run_dirs]
    comparison = {"methods": rows, "paired": paired_changes([Path(d) for d in run_dirs]),
                  "plots": write_compare_plots(out_dir, rows, run_dirs)}
    atomic_write_json(out_dir / "compare.json", comparison)
    atomic_write_text(out_dir / "compare.md", render_comparison(rows, comparison["paired"]))
    log.info("compare: %s", out_dir / "compare.md")
    return comparison


def render_comparison(rows: list[dict], paired: dict) -> str:
    suites = sorted({s for r in rows for s in r["scores"]})
    header = "| method | " + " | ".join(
        f"{s} ({'acc' if rows[0]['scores'].get(s, {}).get('metric') == 'accuracy' else 'NLL'})" for s in suites
    ) + " | KL from base | weight drift |"
    lines = ["# sa-sft comparison", "",
             "Each method on the same task, schedule and seed. Accuracy: higher is better; NLL: lower is better "
             "(`task_heldout` in-domain, `self_heldout` the base model's own answers); 95% intervals in brackets.",
             "", header, "|---|" + "---:|" * (len(suites) + 2)]
    for r in rows:
        cells = []
        for s in suites:
            v = r["scores"].get(s)
            cells.append(f"{v['value']} [{v['ci95'][0]}, {v['ci95'][1]}]" if v and v.get("ci95") else
                         (str(v["value"]) if v else ""))
        lines.append(f"| {r['method']} | " + " | ".join(cells) +
                     f" | {r['kl_base_final']} | {r['drift_relative']} |")
    fmt = lambda c: f"{c['delta']:+.4g} [{c['ci95'][0]:+.4g}, {c['ci95'][1]:+.4g}]"
    if paired["vs_base"]:
        lines += ["", "## Change from the base model, item by item", "",
                  "Final minus base on the same items, 95% paired bootstrap interval; an interval that holds 0 "
                  "is no measurable change.", "",
                  "| method | " + " | ".join(suites) + " |", "|---|" + "---:|" * len(suites)]
        for method, changes in paired["vs_base"].items():
            lines.append(f"| {method} | " + " | ".join(fmt(changes[s]) if s in changes else "" for s in suites) + " |")
    if paired["sa_sft_vs_task_only"]:
        lines += ["", "## SA-SFT against task-only SFT", "",
                  "sa_sft minus task_only on the same items (accuracy: positive favours SA-SFT; NLL: negative "
                  "favours SA-SFT), 95% paired bootstrap interval.", ""]
        for suite, c in paired["sa_sft_vs_task_only"].items():
            lower_better = "accuracy" != next((r["scores"][suite]["metric"] for r in rows if suite in r["scores"]), "")
            favours = ("SA-SFT" if (c["delta"] < 0) == lower_better else "task-only")
            verdict = ("no measurable difference" if c["ci95"][0] <= 0 <= c["ci95"][1]
                       else f"favours {favours}")
            lines.append(f"- {suite}: {fmt(c)} (n={c['n']}): {verdict}")
    lines += ["", "Plots: `plots/compare_scores.png`, `plots/compare_drift.png`, `plots/compare_loss.png`."]
    return "\n".join(lines) + "\n"


def comparison_from_dirs(run_dirs: list[Path]) -> dict:
    """`sa-sft report DIR DIR ...`: the comparison from run directories alone, written next to them."""
    parents = {Path(d).resolve().parent for d in run_dirs}
    out_dir = parents.pop() if len(parents) == 1 else Path(".")
    return write_comparison([Path(d) for d in run_dirs], out_dir)

