"""train.report_to: TensorBoard, W&B (offline) and MLflow (a local file store) with the real libraries,
read back from the files they wrote: every metric line at its step, the run config, the evaluation
summary in the same tracker run from a later process, a resumed training logging each step once,
a broken tracker dropped with a warning, and the settings that cannot work refused before any stage."""
import json
import logging
import subprocess
import sys
import time

import pytest
from tracker_files import mlflow_client, offline_trackers, tensorboard_scalars, wandb_runs  # tests/

from sa_sft.config import load_config, section_for_results
from sa_sft.errors import UserError
from sa_sft.rundir import RunDir

ALL = "train.report_to=[tensorboard,wandb,mlflow]"


@pytest.fixture
def offline(tmp_path, monkeypatch):
    offline_trackers(monkeypatch, tmp_path)


def record(step: int) -> dict:
    """A line of train/metrics.jsonl as the trainer writes it."""
    return {"step": step, "epoch": 0, "loss": round(2.0 / step, 6), "lr": 1e-5 * step,
            "grad_norm": None if step == 2 else 0.5 + step, "tokens_per_s": 100.0 + step,
            "mfu": 0.01 * step, "mfu_per_rank": [0.01 * step, 0.02 * step], "tflops_per_s": 0.1,
            "samples_per_s": 4.0, "step_seconds": 1.5, "data_wait_s": 0.001}


SUMMARY = {"mean_nll": {"task_heldout": {"base": 1.25, "final": 0.75}, "self_heldout": {"base": 0.5, "final": 0.625}},
           "accuracy": {"gsm_symbolic": {"base": 0.125, "final": 0.25}}, "style_gap": 0.75, "kl_base_final": 0.03125,
           "drift_relative": None, "files": ["eval/base.json"]}


def finish_training(run: RunDir, steps: int) -> None:
    """The train stage's manifest, as the runner writes it: the evaluation logs at its last step."""
    run.open_stage("train", {"test": True}).finish(steps=steps)


# ---- the config keys
def test_report_to_is_a_validated_list_that_does_not_change_results():
    assert load_config("tiny").train.report_to == ["tensorboard"]
    assert load_config("tiny", [ALL]).train.report_to == ["tensorboard", "wandb", "mlflow"]
    assert load_config("tiny", ["train.report_to=wandb"]).train.report_to == ["wandb"]
    assert load_config("tiny", ["train.report_to=[]"]).train.report_to == []
    assert load_config("tiny", ["train.report_to="]).train.report_to == []
    train = section_for_results(load_config("tiny", [ALL, "train.tracker_project=x"]).train)
    assert "report_to" not in train and "tracker_project" not in train  # not in any fingerprint
    for override, message in [
        ("train.report_to=[tensorboard,comet]",
         "config key train.report_to[1] must be one of tensorboard, wandb, mlflow; got 'comet'"),
        ("train.tensorboard=false", "config key train.tensorboard is now train.report_to, a list of trackers "
                                    "(tensorboard, wandb, mlflow; [] for none)"),
    ]:
        with pytest.raises(UserError) as err:
            load_config("tiny", [override])
        assert str(err.value) == message


# ---- refused before any stage
def sa_sft(*args, env=None, block=()):
    """The CLI in a fresh interpreter; `block`: packages made unimportable there (as if not installed)."""
    code = (f"import sys; sys.modules.update(dict.fromkeys({list(block)!r})); "
            "from sa_sft.cli import main; sys.exit(main())")
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, timeout=300)


def test_a_tracker_that_cannot_work_is_refused_before_any_stage(tmp_path, offline):
    import os

    out = tmp_path / "run"
    started = time.time()
    proc = sa_sft("run", "tiny", f"output_dir={out}", ALL, block=["wandb"])
    assert proc.returncode == 2 and time.time() - started < 120
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: config key train.report_to names wandb, but the wandb package is not installed: "
        "pip install 'wandb==0.31.0' (or leave wandb out of train.report_to)")
    proc = sa_sft("run", "tiny", f"output_dir={out}", "train.report_to=[mlflow]", block=["mlflow"])
    assert proc.returncode == 2 and "pip install 'mlflow-skinny==3.17.2'" in proc.stderr.strip().splitlines()[-1]
    # Online W&B with no key anywhere: refused now, not when rank 0 starts after generation.
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(HOME=str(tmp_path / "home"), NETRC=str(tmp_path / "no-netrc"))
    proc = sa_sft("run", "tiny", f"output_dir={out}", "train.report_to=[wandb]", env=env)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith(
        "error: config key train.report_to names wandb, which logs online, but no W&B API key is set")
    # A tracking URI that MLflow cannot use (a file where its store would be).
    (tmp_path / "taken").write_text("x")
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"file:{tmp_path / 'taken'}", "MLFLOW_ALLOW_FILE_STORE": "true"}
    proc = sa_sft("run", "tiny", f"output_dir={out}", "train.report_to=[mlflow]", env=env)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith(
        f"error: config key train.report_to names mlflow, but MLFLOW_TRACKING_URI=file:{tmp_path / 'taken'} does not work: ")
    assert not (out / "generate").exists()


# ---- the trackers with the real libraries
def test_metrics_config_and_evaluation_summary_land_in_every_tracker(tmp_path, offline):
    from sa_sft.trackers import Trackers, log_evaluation

    run = RunDir(tmp_path / "my-run")
    cfg = load_config("tiny", [f"output_dir={run.root}", ALL, "train.learning_rate=3e-5"])
    trackers = Trackers(cfg, run, "train", resume_step=0)
    assert [t.name for t in trackers.open] == ["tensorboard", "wandb", "mlflow"]
    records = [record(step) for step in (1, 2, 3)]
    for line in records:
        trackers.log_metrics(line)
    trackers.close()
    ids = json.loads(run.tracker_runs("train").read_text())
    assert set(ids) == {"wandb", "mlflow"}

    # The evaluate stage: another tracker session, later, into the same tracker runs.
    finish_training(run, steps=3)
    log_evaluation(cfg, run, SUMMARY)
    assert not run.tracker_runs("evaluate").exists()  # it made no tracker run of its own

    # W&B: two offline segments of one run (`wandb sync` uploads them in order).
    train_run, eval_run = wandb_runs(run.wandb_dir)
    assert train_run["id"] == eval_run["id"] == ids["wandb"]
    assert train_run["config"]["train"]["learning_rate"] == 3e-5
    assert train_run["config"]["train"]["report_to"] == ["tensorboard", "wandb", "mlflow"]
    assert sorted(train_run["history"]) == [1, 2, 3]
    for line in records:
        logged = train_run["history"][line["step"]]
        assert logged["train/loss"] == line["loss"] and logged["train/tokens_per_s"] == line["tokens_per_s"]
        assert logged["train/mfu_per_rank_rank1"] == line["mfu_per_rank"][1]
        assert ("train/grad_norm" in logged) == (line["grad_norm"] is not None)
    assert eval_run["summary"]["eval/mean_nll/task_heldout/final"] == 0.75
    assert eval_run["summary"]["eval/accuracy/gsm_symbolic/base"] == 0.125
    assert eval_run["summary"]["eval/kl_base_final"] == 0.03125
    assert not any("drift_relative" in key or "files" in key for key in eval_run["summary"])

    # MLflow: the file store in the run directory; params are the config, metrics by step.
    client = mlflow_client(run)
    found = client.get_run(ids["mlflow"])
    assert found.info.run_name == "my-run" and found.info.status == "FINISHED"
    assert found.data.params["train.learning_rate"] == "3e-05"
    assert json.loads(found.data.params["train.report_to"]) == ["tensorboard", "wandb", "mlflow"]
    assert client.get_experiment(found.info.experiment_id).name == "sa-sft"
    loss = client.get_metric_history(ids["mlflow"], "train/loss")
    assert [(m.step, m.value) for m in loss] == [(r["step"], r["loss"]) for r in records]
    assert [m.step for m in client.get_metric_history(ids["mlflow"], "train/grad_norm")] == [1, 3]
    assert [(m.step, m.value) for m in client.get_metric_history(ids["mlflow"], "eval/mean_nll/self_heldout/final")] \
        == [(3, 0.625)]

    # TensorBoard: training under train/, the summary under eval/.
    train_tb = tensorboard_scalars(run.tensorboard)
    assert train_tb["train/loss"] == pytest.approx({r["step"]: r["loss"] for r in records})
    assert train_tb["train/mfu_per_rank_rank0"] == pytest.approx({r["step"]: r["mfu_per_rank"][0] for r in records})
    assert tensorboard_scalars(run.eval_tensorboard)["eval/style_gap"] == {3: 0.75}


def test_a_resumed_training_logs_every_step_once(tmp_path, offline):
    """A training stopped after step 4 with its checkpoint at step 2 resumes from 2: the trackers keep
    steps 1-4 as first logged (the resumed steps repeat them exactly) and step 5 follows once."""
    from sa_sft.trackers import Trackers

    run = RunDir(tmp_path / "run")
    cfg = load_config("tiny", [f"output_dir={run.root}", "train.report_to=[tensorboard,mlflow]"])
    first = Trackers(cfg, run, "train", resume_step=0)
    for step in (1, 2, 3, 4):
        first.log_metrics(record(step))
    first.close("KILLED")
    run_id = json.loads(run.tracker_runs("train").read_text())["mlflow"]
    assert mlflow_client(run).get_run(run_id).info.status == "KILLED"
    again = Trackers(cfg, run, "train", resume_step=2)
    for step in (3, 4, 5):
        again.log_metrics({**record(step), "tokens_per_s": 999.0})
    again.close()
    assert json.loads(run.tracker_runs("train").read_text())["mlflow"] == run_id  # the same tracker run
    client = mlflow_client(run)
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "train/tokens_per_s")] == [
        (1, 101.0), (2, 102.0), (3, 103.0), (4, 104.0), (5, 999.0)]
    assert client.get_run(run_id).info.status == "FINISHED"
    # TensorBoard drops what came after the checkpoint, as train/metrics.jsonl does.
    assert tensorboard_scalars(run.tensorboard)["train/tokens_per_s"] == {
        1: 101.0, 2: 102.0, 3: 999.0, 4: 999.0, 5: 999.0}


def test_evaluation_without_training_gets_tracker_runs_of_its_own(tmp_path, offline):
    from sa_sft.trackers import log_evaluation

    run = RunDir(tmp_path / "base-only")
    cfg = load_config("tiny", [f"output_dir={run.root}", "train.report_to=[mlflow]", "train.tracker_project=forget"])
    log_evaluation(cfg, run, SUMMARY)
    run_id = json.loads(run.tracker_runs("evaluate").read_text())["mlflow"]
    client = mlflow_client(run)
    found = client.get_run(run_id)
    assert client.get_experiment(found.info.experiment_id).name == "forget"
    assert found.data.metrics["eval/mean_nll/task_heldout/base"] == 1.25
    assert found.data.params["model.path"] == "tiny"
    log_evaluation(cfg, run, {**SUMMARY, "style_gap": 0.5})  # a rerun: the same tracker run
    assert json.loads(run.tracker_runs("evaluate").read_text())["mlflow"] == run_id
    assert [m.value for m in client.get_metric_history(run_id, "eval/style_gap")] == [0.75, 0.5]


def test_a_tracker_that_fails_is_dropped_with_one_warning_and_the_others_go_on(tmp_path, offline, monkeypatch, caplog):
    from sa_sft.trackers import Trackers

    (tmp_path / "taken").write_text("x")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"file:{tmp_path / 'taken'}")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    run = RunDir(tmp_path / "run")
    cfg = load_config("tiny", [f"output_dir={run.root}", "train.report_to=[mlflow,tensorboard]"])
    with caplog.at_level(logging.WARNING, logger="sa_sft.trackers"):
        trackers = Trackers(cfg, run, "train", resume_step=0)
        for step in (1, 2):
            trackers.log_metrics(record(step))
        trackers.close()
    warnings = [r.getMessage() for r in caplog.records if r.name == "sa_sft.trackers"]
    assert len(warnings) == 1 and warnings[0].startswith("mlflow: could not start (")
    assert tensorboard_scalars(run.tensorboard)["train/loss"] == {1: 2.0, 2: 1.0}
    assert not run.tracker_runs("train").exists()
