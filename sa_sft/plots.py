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


def write_compare_plots(out: CompareDir, rows: list[dict], runs: list[RunDir]) -> list[Path]:
    """Scores per method with their intervals, drift per layer and loss curves, one figure each."""
    plt = _pyplot()
    written = []
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
