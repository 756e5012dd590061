"""`sa-sft compare`: the same task, schedule and seed under each method the paper compares, each a
normal run directory under output_dir, then one comparison report.

Methods are config presets (overrides), not code paths (`compare.methods`, or --methods):
    base              no training: the model as it was
    task_only         plain SFT on the task data (mix.self_ratio=0)
    task_only_low_lr  the same at a tenth of the learning rate ("learn less, forget less")
    sa_sft            task data + the model's own self-dialogues at the configured lambda
                      (sa_sft@LAMBDA: at another lambda, from the same generation)
    freeze            task-only SFT with the bottom half of the layers frozen
    external          task data + general chats from PyPI (sharegpt) at the same ratio, instead of self-dialogues
    rewrite           SDFT-style: task-only SFT on the model's own rewrites of the task answers
    lora              task-only LoRA (peft; rank 16, alpha 32, every linear layer) at 10x the learning
                      rate, the usual practice for adapters ("learns less, forgets less")
    wise_ft@ALPHA     WiSE-FT: the base and task_only's weights mixed at ALPHA, no training
A +seedN suffix trains with another data order (train.seed=N; same items, same generation):
task_only+seed2. Generation runs once (the sa_sft runs'; rewrite makes its own), every run scores
the same held-out items, and the base model is scored once and its scores reused.
"""
import logging
import re
import shutil
from pathlib import Path

from sa_sft.config import Config, load_config
from sa_sft.data.plan import self_samples_needed
from sa_sft.data.task import open_data
from sa_sft.errors import UserError
from sa_sft.evaluate.stats import item_sums, paired_bootstrap_delta, seeded_bootstrap_delta
from sa_sft.io import atomic_write_json, atomic_write_text, read_json
from sa_sft.models import resolve_model
from sa_sft.pipeline.runner import run_stages
from sa_sft.rundir import CompareDir, RunDir
from sa_sft.train.freezing import num_layers

log = logging.getLogger("sa_sft.compare")

PRESETS = ("base", "task_only", "task_only_low_lr", "sa_sft", "freeze", "external", "rewrite", "lora", "wise_ft")
METHOD = re.compile(r"^(?P<preset>[a-z_]+)(?:@(?P<value>\d+(?:\.\d+)?))?(?:\+seed(?P<seed>\d+))?$")


def parse_method(name: str) -> tuple[str, float | None, int | None]:
    """`PRESET[@VALUE][+seedN]` -> (preset, value, seed)."""
    found = METHOD.match(name)
    if not found or found["preset"] not in PRESETS:
        raise UserError(f"compare: unknown method {name!r} (presets: {', '.join(PRESETS)}; PRESET@VALUE for "
                        f"sa_sft and wise_ft; +seedN for another training order)")
    value = float(found["value"]) if found["value"] is not None else None
    if value is not None and found["preset"] not in ("sa_sft", "wise_ft"):
        raise UserError(f"compare: method {name!r}: only sa_sft@LAMBDA and wise_ft@ALPHA take a value")
    if found["preset"] == "wise_ft" and (value is None or not 0 <= value <= 1):
        raise UserError(f"compare: method {name!r} needs an alpha in [0, 1], e.g. wise_ft@0.5")
    if found["preset"] == "base" and found["seed"]:
        raise UserError(f"compare: method {name!r}: the base model is not trained, so it has no seed")
    return found["preset"], value, int(found["seed"]) if found["seed"] else None


def method_overrides(method: str, cfg: Config, out: CompareDir | None = None) -> list[str]:
    preset, value, seed = parse_method(method)
    ratio = cfg.mix.self_ratio or 1.0
    seeded = [f"train.seed={seed}"] if seed is not None else []
    if preset in ("base", "task_only"):
        return ["mix.self_ratio=0", *seeded]
    if preset == "task_only_low_lr":
        return ["mix.self_ratio=0", f"train.learning_rate={cfg.train.learning_rate / 10:g}", *seeded]
    if preset == "sa_sft":
        return [f"mix.self_ratio={value if value is not None else ratio:g}", *seeded]
    if preset == "freeze":
        layers = num_layers(resolve_model(cfg.model.path))
        return ["mix.self_ratio=0", f"train.freeze_layers={layers // 2}", *seeded]
    if preset == "external":
        return ["mix.self_ratio=0", f"mix.external_ratio={ratio}",
                f"data.external_path={cfg.data.external_path or 'builtin:sharegpt'}", *seeded]
    if preset == "rewrite":
        return ["generate.strategy=rewrite", "mix.self_ratio=0", "data.heldout_self=0", *seeded]
    if preset == "lora":
        return ["mix.self_ratio=0", "train.lora_rank=16", "train.lora_alpha=32",
                f"train.learning_rate={cfg.train.learning_rate * 10:g}", *seeded]
    # wise_ft: interpolates task_only's weights (of the same seed); no training of its own.
    source = "task_only" + (f"+seed{seed}" if seed is not None else "")
    where = (out or CompareDir(cfg.output_dir)).method(source).root
    return ["mix.self_ratio=0", f"train.interpolate_from={where}", f"train.interpolate_alpha={value:g}"]


def needs(method: str) -> str | None:
    """The method whose run must finish first (WiSE-FT mixes task_only's weights)."""
    preset, _, seed = parse_method(method)
    return ("task_only" + (f"+seed{seed}" if seed is not None else "")) if preset == "wise_ft" else None


def is_method(name: str) -> bool:
    try:
        parse_method(name)
        return True
    except UserError:
        return False


def own_generation(method: str) -> bool:
    return parse_method(method)[0] == "rewrite"


def shared_generation(config: str, overrides: list[str], cfg: Config, methods: list[str]) -> list[str]:
    """Every method reuses one generation, so its config must be the same for all: with
    generate.num_samples=-1 the count follows mix.self_ratio, which differs between methods, so
    it is fixed once to what the largest lambda among the sa_sft methods needs (a smaller lambda
    takes a prefix of the same self-dialogues)."""
    if cfg.generate.num_samples >= 0 or cfg.generate.strategy == "rewrite":
        return []
    task_rows = sum(1 for _ in open_data(cfg.data))
    wanted = [m for m in methods if parse_method(m)[0] == "sa_sft"] or ["sa_sft"]
    return [f"generate.num_samples={max(self_samples_needed(load_config(config, [*overrides, *method_overrides(m, cfg)]), task_rows) for m in wanted)}"]


def run_compare(config: str, overrides: list[str], methods: list[str] | None = None, overwrite: bool = False) -> dict:
    cfg = load_config(config, overrides)
    methods = list(methods or cfg.compare.methods)
    out = CompareDir(cfg.output_dir)
    for m in methods:
        parse_method(m)
        if needs(m) and needs(m) not in methods:
            raise UserError(f"compare: method {m} mixes {needs(m)}'s weights; add {needs(m)} to the methods")
    if len(set(methods)) != len(methods):
        raise UserError(f"compare: a method is listed twice in {','.join(methods)}")
    # sa_sft runs first (their generation is the one the others reuse), WiSE-FT after what it mixes.
    order = sorted(methods, key=lambda m: (not m.startswith("sa_sft"), needs(m) is not None, own_generation(m)))
    shared = shared_generation(config, overrides, cfg, methods)
    configs = {m: load_config(config, [*overrides, *shared, *method_overrides(m, cfg, out), f"output_dir={out.method(m).root}"])
               for m in order}
    for m in order:
        run = out.method(m)
        # What another method's run already made (in this call or an earlier one with other methods) is
        # reused: its generation and the base model's scores. Each stage still checks its inputs.
        names = [*order, *sorted(p.name for p in out.root.glob("*") if p.is_dir() and is_method(p.name))]
        siblings = [out.method(s) for s in dict.fromkeys(names) if s != m and not own_generation(s)]
        source = next((s for s in siblings if s.finished("generate")), None)
        if not own_generation(m) and not run.stage_dir("generate").exists() and source:
            run.create()
            shutil.copytree(source.stage_dir("generate"), run.stage_dir("generate"))
        for path in (run.scores("base"), run.generations("base"), run.kl_samples, run.chat_samples):
            shared_file = next((s.root / run.relative(path) for s in siblings
                                if (s.root / run.relative(path)).exists()), None)
            if not path.exists() and shared_file:
                path.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(shared_file, path)
        stages = ["generate", "mix", "evaluate"] if m == "base" else ["generate", "mix", "train", "evaluate"]
        log.info("compare: == %s == (%s)", m, " ".join(method_overrides(m, cfg, out)))
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


def method_group(name: str) -> str:
    """A method's name without its +seedN suffix: the runs pooled over seeds."""
    return name.split("+seed")[0]


def paired_changes(runs: list[RunDir]) -> dict:
    """Per trained run and suite, final minus base on the same items (paired bootstrap); per method
    with several seeds, the same pooled over its seeds; and each SA-SFT method minus task-only where
    both ran (items and seeds resampled): the question `sa-sft compare` exists to answer."""
    finals = {run.root.name: scored_items(run, "final") for run in runs if run.finished("train")}
    base = next((scored_items(run, "base") for run in runs if scored_items(run, "base")), {})
    changes = {"vs_base": {}, "vs_base_pooled": {}, "sa_sft_vs_task_only": {}}
    same_items = lambda a, b: len(item_sums(a)[1]) == len(item_sums(b)[1])
    for method, suites in finals.items():
        for suite, result in suites.items():
            if suite in base and same_items(base[suite], result):
                a, counts = item_sums(base[suite])
                changes["vs_base"].setdefault(method, {})[suite] = paired_bootstrap_delta(a, item_sums(result)[0], counts)
    groups: dict[str, list[str]] = {}
    for method in finals:
        groups.setdefault(method_group(method), []).append(method)

    def pooled(names_a: list[str] | None, names_b: list[str]) -> dict:
        out = {}
        for suite, result in finals[names_b[0]].items():
            runs_b = [finals[n].get(suite) for n in names_b]
            runs_a = [base.get(suite)] if names_a is None else [finals[n].get(suite) for n in names_a]
            if all(r is not None and same_items(r, result) for r in runs_a + runs_b):
                counts = item_sums(result)[1]
                out[suite] = seeded_bootstrap_delta([item_sums(r)[0] for r in runs_a],
                                                    [item_sums(r)[0] for r in runs_b], counts)
        return out

    for group, names in groups.items():
        if len(names) > 1 and base:
            changes["vs_base_pooled"][group] = pooled(None, names)
    if "task_only" in groups:
        for group, names in groups.items():
            if group.startswith("sa_sft"):
                changes["sa_sft_vs_task_only"][group] = pooled(groups["task_only"], names)
    return changes


def write_comparison(runs: list[RunDir], out: CompareDir) -> dict:
    from sa_sft.plots import write_compare_plots

    missing = [str(run.root) for run in runs if not run.report_json.exists()]
    if missing:
        raise UserError(f"compare: no {runs[0].report_json.name} in {', '.join(missing)}; run those first")
    rows = [method_row(run) for run in runs]
    paired = paired_changes(runs)
    plots = write_compare_plots(out, rows, runs, paired)
    comparison = {"methods": rows, "paired": paired,
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
             "Each method on the same task, schedule and held-out items. Accuracy: higher is better; NLL: lower is "
             "better (`task_heldout` in-domain; `chat_heldout` the base model's own answers to held-out ShareGPT "
             "prompts, fair to every method; `self_heldout` its held-out self-dialogues, which favour SA-SFT by "
             "construction); 95% intervals in brackets.",
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
    if paired.get("vs_base_pooled"):
        lines += ["", "## Change from the base model, pooled over seeds", "",
                  "Mean over the method's training seeds; the interval resamples items and seeds.", "",
                  "| method (seeds) | " + " | ".join(suites) + " |", "|---|" + "---:|" * len(suites)]
        for method, changes in paired["vs_base_pooled"].items():
            seeds = next(iter(changes.values()))["seeds"][1] if changes else 0
            lines.append(f"| {method} ({seeds}) | " + " | ".join(fmt(changes[s]) if s in changes else "" for s in suites) + " |")
    for group, by_suite in paired["sa_sft_vs_task_only"].items():
        lines += ["", f"## {group} against task-only SFT", "",
                  f"{group} minus task_only on the same items, averaged over each one's seeds (accuracy: positive "
                  "favours SA-SFT; NLL: negative favours SA-SFT), 95% bootstrap interval over items and seeds.", ""]
        for suite, c in by_suite.items():
            lower_better = "accuracy" != next((r["scores"][suite]["metric"] for r in rows if suite in r["scores"]), "")
            favours = ("SA-SFT" if (c["delta"] < 0) == lower_better else "task-only")
            verdict = ("no measurable difference" if c["ci95"][0] <= 0 <= c["ci95"][1]
                       else f"favours {favours}")
            lines.append(f"- {suite}: {fmt(c)} (n={c['n']}, seeds {c['seeds'][1]} vs {c['seeds'][0]}): {verdict}")
    lines += ["", "Plots: " + ", ".join(f"`{path.relative_to(out.root)}`" for path in plots) + "."]
    return "\n".join(lines) + "\n"


def comparison_from_dirs(run_dirs: list[Path]) -> dict:
    """`sa-sft report DIR DIR ...`: the comparison from run directories alone, written next to them."""
    parents = {Path(d).resolve().parent for d in run_dirs}
    out = CompareDir(parents.pop() if len(parents) == 1 else Path("."))
    return write_comparison([RunDir(d) for d in run_dirs], out)

