"""`sa-sft compare tiny`: every method preset as a run directory, sharing one generation and one base
evaluation, then the comparison report; `sa-sft report DIR...` rebuilds it from the directories."""
import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration


def sa_sft(*args, timeout=1800):
    return subprocess.run([sys.executable, "-m", "sa_sft.cli", *args], capture_output=True, text=True, timeout=timeout)


def test_compare_runs_every_method_and_writes_one_report(tmp_path, tiny_model):
    """Every preset in one `sa-sft compare`: one generation and one base evaluation shared; another
    seed, another lambda, SDFT-style rewrites, LoRA and WiSE-FT; the general
    suites and the held-out chat retention; seeds pooled into one interval; the plots; and
    `sa-sft report` rebuilding the same comparison from the directories."""
    from safetensors.torch import load_file

    from sa_sft.models import resolve_model

    root = tmp_path / "cmp"
    # task_only_low_lr, freeze, external and plain sa_sft (sa_sft@1) are overrides whose effects other
    # tests cover (test_config: the presets; test_training: freezing; test_mix_stage: external rows;
    # test_pipeline: lambda 1); left out for CI time.
    methods = "base,task_only,task_only+seed2,sa_sft@2,rewrite,lora,wise_ft@0.5"
    # generate.num_samples=-1: the count follows mix.self_ratio, yet every method must share one generation.
    proc = sa_sft("compare", "tiny", f"output_dir={root}", "evaluate.suites=[mmlu,ifeval,arithmetic]",
                  "evaluate.max_items=8", "evaluate.chat_heldout=8", "evaluate.max_new_tokens=16",
                  "generate.num_samples=-1", "--methods", methods)
    assert proc.returncode == 0, proc.stderr[-4000:]
    comparison = json.loads((root / "compare.json").read_text())
    rows = {r["method"]: r for r in comparison["methods"]}
    assert list(rows) == methods.split(",")
    assert not (root / "base" / "train").exists() and rows["base"]["drift_relative"] == 0.0
    for method in ("task_only", "sa_sft@2"):
        assert rows[method]["drift_relative"] > 0 and rows[method]["kl_base_final"] > 0
        assert rows[method]["scores"]["task_heldout"]["value"] < rows["base"]["scores"]["task_heldout"]["value"]
        assert rows[method]["scores"]["mmlu"]["metric"] == "accuracy" and len(rows[method]["scores"]["mmlu"]["ci95"]) == 2
    for method, row in rows.items():
        assert {"mmlu", "ifeval", "arithmetic", "chat_heldout"} <= set(row["scores"]), method
    mixes = {m: json.loads((root / m / "mix" / "manifest.json").read_text())["counts"] for m in rows}
    assert mixes["task_only"]["self"]["samples"] == 0
    assert mixes["sa_sft@2"]["self"]["samples"] == 80  # one generation, sized for the largest lambda
    assert mixes["task_only"] == mixes["task_only+seed2"]
    # One generation (rewrite makes its own), one base evaluation, shared by every run.
    shards = {m: json.loads((root / m / "generate" / "manifest.json").read_text()) for m in rows}
    assert shards["rewrite"]["strategy"] == "rewrite"
    assert all(s["shards"] == shards["sa_sft@2"]["shards"] for m, s in shards.items() if m != "rewrite")
    # (rewrite holds out no self-dialogues, so its base scores lack self_heldout: its own base.json)
    assert len({(root / m / "eval" / "base.json").read_text() for m in rows if m != "rewrite"}) == 1
    # The base model's answers to the held-out chat prompts: made once, scored by every model.
    assert len({(root / m / "eval" / "base-chat-samples.jsonl").read_text() for m in rows}) == 1  # rewrite too
    base_scores = json.loads((root / "base" / "eval" / "base.json").read_text())["suites"]
    assert base_scores["chat_heldout"]["samples"] == 8
    final = json.loads((root / "task_only" / "eval" / "final.json").read_text())["suites"]
    assert final["chat_heldout"]["kl_from_base"]["mean_kl"] > 0

    # Seeds: the same items and mix, another data order, so other losses.
    loss = lambda m: [json.loads(line)["loss"] for line in (root / m / "train" / "metrics.jsonl").read_text().splitlines()]
    assert loss("task_only") != loss("task_only+seed2")

    # WiSE-FT: exactly halfway between the base and task_only's weights, with no training.
    assert not (root / "wise_ft@0.5" / "train" / "metrics.jsonl").exists()
    base_w = load_file(str(resolve_model("tiny") / "model.safetensors"))
    tuned = load_file(str(root / "task_only" / "train" / "final" / "model.safetensors"))
    mixed = load_file(str(root / "wise_ft@0.5" / "train" / "final" / "model.safetensors"))
    for name, tensor in mixed.items():
        expected = (base_w[name].float() + 0.5 * (tuned[name].float() - base_w[name].float())).to(tensor.dtype)
        assert (tensor == expected).all(), name

    # LoRA: trained adapters merged into a plain export of the base model's tensors, checked exactly.
    lora = load_file(str(root / "lora" / "train" / "final" / "model.safetensors"))
    assert set(lora) == set(base_w)
    changed = [n for n in lora if not (lora[n] == base_w[n]).all()]
    assert changed and all(n.endswith("proj.weight") for n in changed)  # only the adapted linear layers moved
    export = json.loads((root / "lora" / "train" / "final" / "sa_sft_export.json").read_text())
    assert export["check"]["mismatched"] == []

    paired = comparison["paired"]
    pooled = paired["vs_base_pooled"]["task_only"]["arithmetic"]
    assert pooled["seeds"] == [1, 2] and pooled["ci95"][0] <= pooled["delta"] <= pooled["ci95"][1]
    versus = paired["sa_sft_vs_task_only"]
    assert set(versus) == {"sa_sft@2"} and versus["sa_sft@2"]["ifeval"]["seeds"] == [2, 1]
    for plot in ("tradeoff.png", "compare_scores.png", "compare_drift.png", "compare_loss.png"):
        assert (root / "plots" / plot).stat().st_size > 1000
    table = (root / "compare.md").read_text()
    assert "| sa_sft@2 |" in table and "| wise_ft@0.5 |" in table
    assert "## sa_sft@2 against task-only SFT" in table and "| task_only (2) |" in table

    (root / "compare.md").unlink()
    proc = sa_sft("report", *[str(root / m) for m in rows])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (root / "compare.md").read_text() == table
