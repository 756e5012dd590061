"""PNG plots of a run: the training loss curve and the weights' drift per layer."""
from pathlib import Path

from sa_sft.io import read_jsonl
from sa_sft.rundir import CompareDir, RunDir


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    return plt


def write_run_plots(run: RunDir, report: dict) -> list[Path]:
    written = []
    metrics = read_jsonl(run.metrics) if run.metrics.exists() else []
    if metrics:
        plt = _pyplot()
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot([m["step"] for m in metrics], [m["loss"] for m in metrics], marker=".")
        ax.set(xlabel="optimizer step", ylabel="training loss", title="Training loss")
        ax.grid(alpha=0.3)
        written.append(_save(fig, run.plot("loss"), plt))
    if report.get("drift"):
        plt = _pyplot()
        groups = report["drift"]["per_group"]
        layers = sorted(g for g in groups if g.startswith("layer."))
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.bar(range(len(layers)), [groups[g] for g in layers])
        ax.set(xlabel="transformer layer", ylabel="||W - W_base|| / ||W_base||",
               title=f"Weight drift per layer (total {report['drift']['relative']:.3g})")
        ax.grid(alpha=0.3, axis="y")
        written.append(_save(fig, run.plot("drift"), plt))
    return written


def _save(fig, path: Path, plt) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    fig.tight_layout()
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return path


# The in-domain measure on the trade-off plot's x axis, best first, and whether lower is better.
IN_DOMAIN = (("task_accuracy", False), ("task_heldout", True))


def tradeoff_points(paired: dict) -> tuple[str | None, list[str], dict]:
    """Per method (pooled over its seeds where it has several): the change from the base in the
    in-domain measure and in each general one, with intervals. Returns (x suite, y suites, points)."""
    changes = {m: c for m, c in paired.get("vs_base", {}).items() if "+seed" not in m}
    changes.update(paired.get("vs_base_pooled", {}))
    suites = {s for c in changes.values() for s in c}
    x = next((name for name, _ in IN_DOMAIN if name in suites), None)
    ys = sorted(s for s in suites if s not in ("task_accuracy", "task_heldout", "self_heldout"))
    return x, ys, changes


def write_tradeoff_plot(out: CompareDir, paired: dict, plt) -> Path | None:
    """In-domain gain against the change in each general suite, one point per method with both
    intervals: the Pareto picture (up and to the right is better: learned more, kept more)."""
    x, ys, changes = tradeoff_points(paired)
    if x is None or not ys or not changes:
        return None
    flip_x = dict(IN_DOMAIN)[x]
    fig, axes = plt.subplots(1, len(ys), figsize=(3.6 * len(ys) + 1.6, 3.6), squeeze=False)
    markers = "os^vD<>pPX*h"
    for ax, y in zip(axes[0], ys):
        flip_y = y.endswith("_heldout")  # NLL: a rise is a loss
        for k, (method, c) in enumerate(sorted(changes.items())):
            if x not in c or y not in c:
                continue
            sx, sy = (-1 if flip_x else 1), (-1 if flip_y else 1)
            cx, cy = c[x], c[y]
            px, py = sx * cx["delta"], sy * cy["delta"]
            xs, ys_ = sorted(sx * v for v in cx["ci95"]), sorted(sy * v for v in cy["ci95"])
            ax.errorbar([px], [py], xerr=[[px - xs[0]], [xs[1] - px]], yerr=[[py - ys_[0]], [ys_[1] - py]],
                        fmt=markers[k % len(markers)], capsize=2, label=method, color=f"C{k % 10}",
                        alpha=0.85, markersize=5)
        ax.axhline(0, color="grey", lw=0.8)
        ax.axvline(0, color="grey", lw=0.8)
        ax.set_xlabel(f"{x} gain" + (" (NLL fall)" if flip_x else ""))
        ax.set_ylabel(f"{y} change" + (" (NLL fall)" if flip_y else ""))
        ax.set_title(f"learned vs kept: {y}", fontsize=9)
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    return _save(fig, out.plot("tradeoff"), plt)


def write_compare_plots(out: CompareDir, rows: list[dict], runs: list[RunDir], paired: dict | None = None) -> list[Path]:
    """Scores per method with their intervals, the learned-vs-kept trade-off, drift per layer and loss
    curves, one figure each."""
    plt = _pyplot()
    written = []
    tradeoff = write_tradeoff_plot(out, paired or {}, plt)
    if tradeoff:
        written.append(tradeoff)
    suites = sorted({s for r in rows for s in r["scores"]})
    if suites:
        fig, axes = plt.subplots(1, len(suites), figsize=(3.2 * len(suites), 3.5), squeeze=False)
        for ax, suite in zip(axes[0], suites):
            names = [r["method"] for r in rows if suite in r["scores"]]
            values = [r["scores"][suite]["value"] for r in rows if suite in r["scores"]]
            cis = [r["scores"][suite].get("ci95") or [v, v] for r, v in
                   zip([r for r in rows if suite in r["scores"]], values)]
            errors = [[v - c[0] for v, c in zip(values, cis)], [c[1] - v for v, c in zip(values, cis)]]
            metric = rows[0]["scores"].get(suite, {}).get("metric", "")
            if metric == "accuracy":
                ax.bar(range(len(names)), values, yerr=errors, capsize=3)
            else:  # NLLs differ in the second decimal: points on a free axis, not bars from zero
                ax.errorbar(range(len(names)), values, yerr=errors, fmt="o", capsize=3)
            ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
            ax.set_title(f"{suite} ({'accuracy' if metric == 'accuracy' else 'mean NLL'})", fontsize=9)
            ax.grid(alpha=0.3, axis="y")
        written.append(_save(fig, out.plot("compare_scores"), plt))
    drifted = [r for r in rows if r["drift_per_group"]]
    if drifted:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for r in drifted:
            layers = sorted(g for g in r["drift_per_group"] if g.startswith("layer."))
            ax.plot(range(len(layers)), [r["drift_per_group"][g] for g in layers], marker=".", label=r["method"])
        ax.set(xlabel="transformer layer", ylabel="||W - W_base|| / ||W_base||", title="Weight drift per layer")
        ax.legend()
        ax.grid(alpha=0.3)
        written.append(_save(fig, out.plot("compare_drift"), plt))
    fig, ax = plt.subplots(figsize=(6, 3.5))
    plotted = False
    for run in runs:
        if run.metrics.exists():
            metrics = read_jsonl(run.metrics)
            ax.plot([m["step"] for m in metrics], [m["loss"] for m in metrics], label=run.root.name)
            plotted = True
    if plotted:
        ax.set(xlabel="optimizer step", ylabel="training loss", title="Training loss")
        ax.legend()
        ax.grid(alpha=0.3)
        written.append(_save(fig, out.plot("compare_loss"), plt))
    else:
        plt.close(fig)
    return written
