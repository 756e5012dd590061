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
import logging
import shutil
from pathlib import Path

from sa_sft.config import Config, load_config
from sa_sft.data.plan import self_samples_needed
from sa_sft.data.task import read_task_data
from sa_sft.errors import UserError
from sa_sft.evaluate.stats import item_sums, paired_bootstrap_delta
from sa_sft.io import atomic_write_json, atomic_write_text, read_json
from sa_sft.models import resolve_model
from sa_sft.pipeline.runner import run_stages
from sa_sft.rundir import CompareDir, RunDir
from sa_sft.train.freezing import num_layers

log = logging.getLogger("sa_sft.compare")

METHODS = ("base", "task_only", "sa_sft", "freeze", "external")


def method_overrides(method: str, cfg: Config) -> list[str]:
    ratio = cfg.mix.self_ratio or 1.0
    if method in ("base", "task_only"):
        return ["mix.self_ratio=0"]
    if method == "sa_sft":
        return [f"mix.self_ratio={ratio}"]
    if method == "freeze":
        layers = num_layers(resolve_model(cfg.model.path))
        return ["mix.self_ratio=0", f"train.freeze_layers={layers // 2}"]
    if method == "external":
        return ["mix.self_ratio=0", f"mix.external_ratio={ratio}",
                f"data.external_path={cfg.data.external_path or 'builtin:sharegpt'}"]
    raise UserError(f"compare: unknown method {method!r} (methods: {', '.join(METHODS)})")


def shared_generation(config: str, overrides: list[str], cfg: Config) -> list[str]:
    """Every method reuses one generation, so its config must be the same for all: with
    generate.num_samples=-1 the count follows mix.self_ratio, which differs between methods, so
    it is fixed once to what the sa_sft method's mix needs."""
    if cfg.generate.num_samples >= 0 or cfg.generate.strategy == "rewrite":
        return []
    sa_sft = load_config(config, [*overrides, *method_overrides("sa_sft", cfg)])
    task_rows = len(read_task_data(cfg.data.task_path, cfg.data.on_bad_row, max_row_bytes=cfg.data.max_row_bytes).rows)
    return [f"generate.num_samples={self_samples_needed(sa_sft, task_rows)}"]


def run_compare(config: str, overrides: list[str], methods: list[str], overwrite: bool = False) -> dict:
    cfg = load_config(config, overrides)
    out = CompareDir(cfg.output_dir)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise UserError(f"compare: unknown method(s) {', '.join(unknown)} (methods: {', '.join(METHODS)})")
    # sa_sft first: its generation is the one every other run reuses.
    order = sorted(methods, key=lambda m: m != "sa_sft")
    shared = shared_generation(config, overrides, cfg)
    configs = {m: load_config(config, [*overrides, *shared, *method_overrides(m, cfg), f"output_dir={out.method(m).root}"])
               for m in order}
    first = out.method(order[0])
    for m in order:
        run = out.method(m)
        if m != order[0] and not run.stage_dir("generate").exists() and first.finished("generate"):
            run.create()
            shutil.copytree(first.stage_dir("generate"), run.stage_dir("generate"))
        for path in (run.scores("base"), run.generations("base"), run.kl_samples, run.chat_samples):
            shared_file = first.root / run.relative(path)
            if m != order[0] and not path.exists() and shared_file.exists():
                path.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(shared_file, path)
        stages = ["generate", "mix", "evaluate"] if m == "base" else ["generate", "mix", "train", "evaluate"]
        log.info("compare: == %s == (%s)", m, " ".join(method_overrides(m, cfg)))
        run_stages(configs[m], stages, overwrite)
    return write_comparison([out.method(m) for m in methods], out)


def method_row(run: RunDir) -> dict:
    report = read_json(run.report_json)
    evals = report.get("eval", {})
    trained = "train" in report
    side = "final" if trained else "base"
    row = {"method": run.root.name, "run_dir": str(run.root), "scores": {}}
    for suite, r in evals.items():
        if side in r:
            row["scores"][suite] = {"metric": r["metric"], "value": r[side], "ci95": r.get("ci95", {}).get(side),
                                    "base": r.get("base")}
    row["kl_base_final"] = report.get("retention", {}).get("kl_base_final") if trained else 0.0
    row["drift_relative"] = report.get("drift", {}).get("relative") if trained else 0.0
    row["drift_per_group"] = report.get("drift", {}).get("per_group", {}) if trained else {}
    row["final_loss"] = report.get("train", {}).get("final_loss")
    return row


def scored_items(run: RunDir, model: str) -> dict:
    path = run.scores(model)
    return read_json(path)["suites"] if path.exists() else {}


def paired_changes(runs: list[RunDir]) -> dict:
    """Per trained method and suite, final minus base on the same items (paired bootstrap), and
    sa_sft minus task_only where both ran: the question `sa-sft compare` exists to answer."""
    finals = {run.root.name: scored_items(run, "final") for run in runs if run.finished("train")}
    base = next((scored_items(run, "base") for run in runs if scored_items(run, "base")), {})
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


def write_comparison(runs: list[RunDir], out: CompareDir) -> dict:
    from sa_sft.plots import write_compare_plots

    missing = [str(run.root) for run in runs if not run.report_json.exists()]
    if missing:
        raise UserError(f"compare: no {runs[0].report_json.name} in {', '.join(missing)}; run those first")
    rows = [method_row(run) for run in runs]
    plots = write_compare_plots(out, rows, runs)
    comparison = {"methods": rows, "paired": paired_changes(runs),
                  "plots": [str(path.relative_to(out.root)) for path in plots]}
    atomic_write_json(out.json, comparison)
    atomic_write_text(out.markdown, render_comparison(rows, comparison["paired"], plots, out))
    log.info("compare: %s", out.markdown)
    return comparison


def render_comparison(rows: list[dict], paired: dict, plots: list[Path], out: CompareDir) -> str:
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
    lines += ["", "Plots: " + ", ".join(f"`{path.relative_to(out.root)}`" for path in plots) + "."]
    return "\n".join(lines) + "\n"


def comparison_from_dirs(run_dirs: list[Path]) -> dict:
    """`sa-sft report DIR DIR ...`: the comparison from run directories alone, written next to them."""
    parents = {Path(d).resolve().parent for d in run_dirs}
    out = CompareDir(parents.pop() if len(parents) == 1 else Path("."))
    return write_comparison([RunDir(d) for d in run_dirs], out)

