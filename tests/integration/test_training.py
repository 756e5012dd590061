"""The DeepSpeed trainer on 2 ranks with the tiny model: exact resume, packing, freezing, export."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

SMALL = ["generate.num_samples=24", "data.max_task_samples=32", "data.heldout_task=8", "data.heldout_self=8",
         "mix.self_ratio=0.5", "generate.max_user_tokens=12", "generate.max_assistant_tokens=16",
         "generate.shard_size=12", "train.micro_batch_size=2", "train.log_every=1"]


def cli(*args, timeout=900):
    return subprocess.run([sys.executable, "-m", "sa_sft.cli", *args], capture_output=True, text=True, timeout=timeout)


def losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "train" / "metrics.jsonl").open()]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """Generated and mixed data shared by the training tests (train reruns from here)."""
    run_dir = tmp_path_factory.mktemp("train") / "base"
    proc = cli("mix", "tiny", f"output_dir={run_dir}", *SMALL)
    assert proc.returncode == 2  # mix alone needs generate first: a clear error
    assert "run `sa-sft generate` first" in proc.stderr
    assert cli("generate", "tiny", f"output_dir={run_dir}", *SMALL).returncode == 0
    assert cli("mix", "tiny", f"output_dir={run_dir}", *SMALL).returncode == 0
    return run_dir


def copy_run(src: Path, dst: Path) -> Path:
    import shutil
    shutil.copytree(src, dst)
    return dst


def latest(run_dir: Path) -> str | None:
    path = run_dir / "train" / "checkpoints" / "latest"
    return path.read_text().strip() if path.exists() else None


def kill_after_checkpoint(args: list[str], run_dir: Path, tag: str) -> None:
    """Start training, SIGKILL every trainer process once checkpoint `tag` is complete (mid-step)."""
    kill_when(args, run_dir, lambda: latest(run_dir) == tag)


def kill_when(args: list[str], run_dir: Path, ready) -> None:
    """Start training, SIGKILL every trainer process as soon as `ready()` holds."""
    proc = subprocess.Popen([sys.executable, "-m", "sa_sft.cli", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if ready():
            break
        time.sleep(0.01)
    assert proc.poll() is None, "training ended before it could be killed"
    # torchrun starts its ranks in sessions of their own: kill the whole tree, not just the group.
    import psutil
    tree = [proc.pid] + [child.pid for child in psutil.Process(proc.pid).children(recursive=True)]
    for pid in tree:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()
    deadline = time.time() + 30
    while any(psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE for pid in tree[1:]):
        assert time.time() < deadline, "trainer processes survived SIGKILL"
        time.sleep(0.1)
    assert not (run_dir / "train" / "manifest.json").exists()


@pytest.mark.parametrize("micro_batch, every, steps, where", [(2, 3, 6, "mid-epoch"), (8, 2, 4, "epoch boundary")])
def test_resume_gives_the_same_loss_at_every_step(prepared, tmp_path, micro_batch, every, steps, where):
    args = [*SMALL, f"train.micro_batch_size={micro_batch}", f"train.checkpoint_every={every}",
            f"train.max_steps={steps}"]
    straight = copy_run(prepared, tmp_path / "straight")
    assert cli("train", "tiny", f"output_dir={straight}", *args).returncode == 0
    resumed = copy_run(prepared, tmp_path / "resumed")
    kill_after_checkpoint(["train", "tiny", f"output_dir={resumed}", *args], resumed, f"step-{every:07d}")
    proc = cli("train", "tiny", f"output_dir={resumed}", *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resumed from step-{every:07d} at step {every}" in proc.stderr
    mix = json.loads((prepared / "mix" / "manifest.json").read_text())
    steps_per_epoch = mix["rows_per_rank"] // micro_batch
    assert (every % steps_per_epoch == 0) == (where == "epoch boundary")
    assert len(losses(straight)) == steps
    assert losses(resumed) == pytest.approx(losses(straight), rel=1e-5)


def test_kill_mid_checkpoint_save_resumes_from_the_last_complete_one(prepared, tmp_path):
    args = [*SMALL, "train.checkpoint_every=2", "train.max_steps=6"]
    straight = copy_run(prepared, tmp_path / "straight")
    assert cli("train", "tiny", f"output_dir={straight}", *args).returncode == 0
    resumed = copy_run(prepared, tmp_path / "resumed")
    partial = resumed / "train" / "checkpoints" / "step-0000004"
    # The save of step 4 has begun (its directory exists) but not every rank has finished it.
    kill_when(["train", "tiny", f"output_dir={resumed}", *args], resumed, partial.exists)
    assert partial.exists() and latest(resumed) == "step-0000002", "the kill did not land inside the save"
    proc = cli("train", "tiny", f"output_dir={resumed}", *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "step-0000004: its save was cut short" in proc.stderr
    assert "resumed from step-0000002 at step 2" in proc.stderr
    assert losses(resumed) == pytest.approx(losses(straight), rel=1e-5)


def test_packing_freezing_and_checked_export(prepared, tmp_path, monkeypatch):
    from tracker_files import mlflow_client, offline_trackers, tensorboard_scalars, wandb_runs  # tests/

    from sa_sft.rundir import RunDir
    offline_trackers(monkeypatch, tmp_path)  # W&B offline, MLflow's file store in the run directory
    run_dir = copy_run(prepared, tmp_path / "packed")
    args = [*SMALL, "train.packing=true", "train.max_seq_len=512", "train.freeze_embeddings=true",
            "train.freeze_layers=1", "train.max_steps=2", "train.micro_batch_size=1",
            "train.report_to=[tensorboard,wandb,mlflow]"]
    proc = cli("run", "tiny", f"output_dir={run_dir}", *args, "--overwrite")
    assert proc.returncode == 0, proc.stderr[-3000:]
    mix = json.loads((run_dir / "mix" / "manifest.json").read_text())
    assert mix["packed"] and mix["packing_efficiency"] > 0.5
    train = json.loads((run_dir / "train" / "manifest.json").read_text())
    # Every exported tensor equals the engine's, bit for bit, whatever precision ran (bf16 or fp32).
    assert train["export_check"] == {"tensors": 20, "max_abs_diff": 0.0}
    assert "20 tensors equal to the trained engine's, bit for bit" in proc.stderr
    # Frozen tensors did not move; the rest did.
    from safetensors.torch import load_file

    from sa_sft.models import prepare_tiny_model
    base = load_file(str(prepare_tiny_model() / "model.safetensors"))
    final = load_file(str(next((run_dir / "train" / "final").glob("*.safetensors"))))
    assert (final["model.embed_tokens.weight"].float() == base["model.embed_tokens.weight"].float()).all()
    assert (final["model.layers.0.mlp.up_proj.weight"].float() == base["model.layers.0.mlp.up_proj.weight"].float()).all()
    assert not (final["model.layers.1.mlp.up_proj.weight"].float() == base["model.layers.1.mlp.up_proj.weight"].float()).all()
    metrics = [json.loads(line) for line in (run_dir / "train" / "metrics.jsonl").open()]
    assert all(m["mfu"] > 0 and "data_wait_s" in m for m in metrics)
    # MFU per rank, against each rank's own peak: a matmul timed on its cores (no datasheet for a CPU).
    assert all(len(m["mfu_per_rank"]) == 2 and min(m["mfu_per_rank"]) > 0 for m in metrics)
    assert len(train["mfu_per_rank"]) == 2 and len(train["mfu_peak"]["tflops_per_rank"]) == 2
    assert train["mfu_peak"]["source"].startswith("measured matmul peak, not a datasheet figure")
    # train.report_to: every metric line in each tracker, and the evaluation summary (logged by the evaluate
    # stage, another process) in the same W&B and MLflow runs.
    run = RunDir(run_dir)
    ids = json.loads(run.tracker_runs("train").read_text())
    loss = {m["step"]: m["loss"] for m in metrics}
    assert sorted(loss) == [1, 2]
    assert tensorboard_scalars(run.tensorboard)["train/loss"] == pytest.approx(loss)
    final_nll = run.manifest("evaluate")["mean_nll"]["task_heldout"]["final"]
    client = mlflow_client(run)
    assert {m.step: m.value for m in client.get_metric_history(ids["mlflow"], "train/loss")} == loss
    assert client.get_run(ids["mlflow"]).data.metrics["eval/mean_nll/task_heldout/final"] == final_nll
    wandb_train, wandb_eval = wandb_runs(run.wandb_dir)
    assert wandb_train["id"] == wandb_eval["id"] == ids["wandb"]
    assert {step: line["train/loss"] for step, line in wandb_train["history"].items()} == loss
    assert wandb_eval["summary"]["eval/mean_nll/task_heldout/final"] == final_nll


def test_a_corrupted_export_fails_in_one_line_and_the_rerun_exports_without_retraining(prepared, tmp_path):
    """A write that went wrong between the export and its check: the check names the tensor, the stage
    fails with one line, and the rerun exports again from the final checkpoint."""
    from safetensors.torch import load_file, save_file

    from sa_sft.rundir import RunDir
    run_dir = copy_run(prepared, tmp_path / "corrupt")
    args = ["train", "tiny", f"output_dir={run_dir}", *SMALL, "train.max_steps=2"]
    assert cli(*args).returncode == 0
    run = RunDir(run_dir)
    weights = next(run.final.glob("*.safetensors"))
    tensors = load_file(str(weights))
    tensors["model.layers.1.mlp.up_proj.weight"][0, 0] += 1.0
    save_file(tensors, str(weights), metadata={"format": "pt"})
    record = json.loads(run.export_record.read_text())
    del record["check"]  # as if the ranks died between writing the export and checking it
    run.export_record.write_text(json.dumps(record))
    run.manifest_path("train").unlink()
    proc = cli(*args)
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: train: the exported model does not hold the trained weights "
                           "(model.layers.1.mlp.up_proj.weight: max |difference| 1)"), last
    assert run.rejected_export.is_dir() and not run.final.exists()
    proc = cli(*args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from step-0000002 at step 2" in proc.stderr and "bit for bit" in proc.stderr
    assert len(losses(run_dir)) == 2  # not retrained
    assert json.loads(run.manifest_path("train").read_text())["export_check"]["max_abs_diff"] == 0.0


def test_the_same_losses_with_checkpointed_activations_and_more_micro_batches(prepared, tmp_path):
    """Activation checkpointing recomputes the same activations, and splitting a step's samples into
    more micro-batches leaves every loss token's weight the same: the losses of a run with both equal
    those of a run with neither (fp32, so to rounding)."""
    args = [*SMALL, "train.max_steps=3", "train.precision=fp32"]
    plain = ["train.gradient_checkpointing=false", "train.micro_batch_size=2", "train.gradient_accumulation_steps=1"]
    both = ["train.gradient_checkpointing=true", "train.micro_batch_size=1", "train.gradient_accumulation_steps=2"]
    one, two = copy_run(prepared, tmp_path / "a"), copy_run(prepared, tmp_path / "b")
    for run_dir, extra in ((one, plain), (two, both)):
        proc = cli("train", "tiny", f"output_dir={run_dir}", *args, *extra)
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert losses(one) == pytest.approx(losses(two), rel=2e-5)


def test_exported_model_loads_in_vllm(prepared, tmp_path):
    """The exported folder is what generation and users load: vLLM must take it."""
    run_dir = copy_run(prepared, tmp_path / "vllm")
    assert cli("train", "tiny", f"output_dir={run_dir}", *SMALL, "train.max_steps=1").returncode == 0
    final = run_dir / "train" / "final"
    proc = cli("generate", "tiny", f"output_dir={tmp_path / 'from_final'}", f"model.path={final}",
               "generate.num_samples=8", "generate.shard_size=8", "generate.max_user_tokens=8",
               "generate.max_assistant_tokens=8")
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads((tmp_path / "from_final" / "generate" / "manifest.json").read_text())
    assert manifest["num_samples"] == 8 and manifest["inputs"]["model"]["path"] == str(final)


def test_deepspeed_launcher_with_zero2(prepared, tmp_path):
    run_dir = copy_run(prepared, tmp_path / "zero2")
    proc = cli("train", "tiny", f"output_dir={run_dir}", *SMALL, "train.max_steps=2", "train.launcher=deepspeed",
               "train.deepspeed_config=zero2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads((run_dir / "train" / "manifest.json").read_text())
    assert manifest["zero_stage"] == 2 and manifest["ranks"] == 2 and manifest["steps"] == 2
