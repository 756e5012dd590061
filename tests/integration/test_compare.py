"""`sa-sft compare tiny`: five methods as five run directories sharing one generation and one base
evaluation, then the comparison report; `sa-sft report DIR...` rebuilds it from the directories."""
import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration


def sa_sft(*args, timeout=1800):
    return subprocess.run([sys.executable, "-m", "sa_sft.cli", *args], capture_output=True, text=True, timeout=timeout)


def test_compare_runs_every_method_and_writes_one_report(tmp_path, tiny_model):
    root = tmp_path / "cmp"
    # generate.num_samples=-1: the count follows mix.self_ratio, yet every method must share one generation.
    proc = sa_sft("compare", "tiny", f"output_dir={root}", "evaluate.suites=[mmlu]", "evaluate.max_items=16",
                  "generate.num_samples=-1")
    assert proc.returncode == 0, proc.stderr[-4000:]
    comparison = json.loads((root / "compare.json").read_text())
    rows = {r["method"]: r for r in comparison["methods"]}
    assert list(rows) == ["base", "task_only", "sa_sft", "freeze", "external"]
    assert not (root / "base" / "train").exists() and rows["base"]["drift_relative"] == 0.0
    for method in ("task_only", "sa_sft", "freeze", "external"):
        assert rows[method]["drift_relative"] > 0 and rows[method]["kl_base_final"] > 0
        assert rows[method]["scores"]["task_heldout"]["value"] < rows["base"]["scores"]["task_heldout"]["value"]
        assert rows[method]["scores"]["mmlu"]["metric"] == "accuracy" and len(rows[method]["scores"]["mmlu"]["ci95"]) == 2
    mixes = {m: json.loads((root / m / "mix" / "manifest.json").read_text())["counts"] for m in rows}
    assert mixes["sa_sft"]["self"]["samples"] == 40 and mixes["task_only"]["self"]["samples"] == 0
    assert mixes["external"]["external"]["samples"] == 40
    freeze = (root / "freeze" / "train" / "config.yaml").read_text()
    assert "freeze_layers: 1" in freeze  # half of the tiny model's 2 layers
    # One generation, one base evaluation, shared by every run.
    shards = {m: json.loads((root / m / "generate" / "manifest.json").read_text())["shards"] for m in rows}
    assert all(s == shards["sa_sft"] for s in shards.values())
    assert len({(root / m / "eval" / "base.json").read_text() for m in rows}) == 1
    for plot in ("compare_scores.png", "compare_drift.png", "compare_loss.png"):
        assert (root / "plots" / plot).stat().st_size > 1000
    table = (root / "compare.md").read_text()
    assert "| sa_sft |" in table and "| external |" in table

    (root / "compare.md").unlink()
    proc = sa_sft("report", *[str(root / m) for m in rows])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (root / "compare.md").read_text() == table
