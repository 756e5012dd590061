"""The sbatch scripts on a real Slurm cluster of two logical nodes (slurmctld + 2 slurmd, munge):
the whole pipeline in one job, and a chain whose training job is cancelled and resubmitted."""
import json
import time

import pytest
from conftest import REPO, job_env

from sa_sft.cluster.slurm import write_scripts

pytestmark = [pytest.mark.integration, pytest.mark.cluster]


def job_output(path) -> str:
    return path.read_text(errors="replace")[-4000:] if path.exists() else "(no job output)"


def test_whole_pipeline_in_one_two_node_job(slurm, tmp_path):
    run_dir = tmp_path / "run"
    job = slurm.sbatch("--nodes=2", f"--output={tmp_path}/job-%j.out", str(REPO / "slurm" / "sa_sft.sbatch"),
                       "tiny", f"output_dir={run_dir}", "generate.engines=2", env=job_env(), cwd=tmp_path)
    state = slurm.wait(job, timeout=900)
    assert state == "COMPLETED", job_output(tmp_path / f"job-{job}.out")

    generate = json.loads((run_dir / "generate" / "manifest.json").read_text())
    # One engine on each node's Ray worker, and both wrote shards.
    assert [node.split("/")[0] for node in generate["engine_nodes"]] == ["n1", "n2"]
    assert sorted(node.split("/")[0] for node in generate["shards_by_node_this_run"]) == ["n1", "n2"]
    train = json.loads((run_dir / "train" / "manifest.json").read_text())
    assert [(p["rank"], p["host"]) for p in train["placement"]] == [(0, "n1"), (1, "n2")]
    assert train["steps"] == 6 and train["ranks"] == 2
    report = json.loads((run_dir / "report.json").read_text())
    for stage in ("generate", "mix", "train", "evaluate"):
        assert report["stages"][stage]["seconds"] > 0
    assert report["eval"]["task_heldout"]["final"] > 0
    log = (run_dir / "sa_sft.log").read_text()
    assert "ray: 2 node(s) joined" in log and "ray: stopped on every node; nodes free" in log
    assert (run_dir / "logs" / f"ray-head-job{job}.log").exists()
    assert (run_dir / "logs" / f"ray-workers-job{job}.log").exists()


def wait_for_checkpoint(run_dir, min_step: int, timeout: float) -> None:
    deadline = time.time() + timeout
    metrics = run_dir / "train" / "metrics.jsonl"
    while time.time() < deadline:
        latest = run_dir / "train" / "checkpoints" / "latest"
        if latest.exists() and metrics.exists() and len(metrics.read_text().splitlines()) >= min_step:
            return
        time.sleep(0.5)
    raise TimeoutError(f"no checkpoint at step >= {min_step} after {timeout} s")


def test_cancelled_training_resumes_when_the_chain_is_resubmitted(slurm, tmp_path):
    run_dir = tmp_path / "run"
    config = ["tiny", f"output_dir={run_dir}", "train.max_steps=40", "train.checkpoint_every=4"]
    # The scripts as an installed package hands them out (`sa-sft slurm-scripts DIR`), away from the
    # checkout: submit_chain.sh submits the sbatch files next to it.
    scripts = tmp_path / "scripts"
    write_scripts(scripts)
    chain = slurm.run(str(scripts / "submit_chain.sh"), "--nodes=2", f"--output={tmp_path}/job-%j.out",
                      "--", *config, env=job_env(), cwd=tmp_path)
    assert chain.returncode == 0, chain.stderr
    jobs = dict(line.split() for line in chain.stdout.splitlines())
    assert list(jobs) == ["generate", "train", "evaluate"]
    assert slurm.wait(jobs["generate"], timeout=600) == "COMPLETED", job_output(tmp_path / f"job-{jobs['generate']}.out")

    wait_for_checkpoint(run_dir, min_step=5, timeout=600)
    assert slurm.run("scancel", jobs["train"]).returncode == 0
    assert slurm.wait(jobs["train"], timeout=120) == "CANCELLED"
    assert slurm.wait(jobs["evaluate"], timeout=60) == "CANCELLED"  # its dependency can never be met
    stopped = json.loads((run_dir / "train" / "interrupted.json").read_text())
    # scancel sends SIGTERM to the ranks and to sa-sft, which relays it to srun as SIGUSR1: whichever
    # reaches a rank first is recorded; both mean "checkpoint at the step boundary and stop".
    assert stopped["signal"] in ("SIGTERM", "SIGUSR1") and 5 <= stopped["step"] < 40
    assert not (run_dir / "train" / "manifest.json").exists()

    chain = slurm.run(str(scripts / "submit_chain.sh"), "--nodes=2", f"--output={tmp_path}/job-%j.out",
                      "--", *config, env=job_env(), cwd=tmp_path)
    jobs = dict(line.split() for line in chain.stdout.splitlines())
    for stage in ("generate", "train", "evaluate"):
        assert slurm.wait(jobs[stage], timeout=900) == "COMPLETED", job_output(tmp_path / f"job-{jobs[stage]}.out")
    log = (run_dir / "train" / "train.log").read_text()
    assert f"resumed from step-{stopped['step']:07d} at step {stopped['step']}" in log
    steps = [json.loads(line)["step"] for line in (run_dir / "train" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 41))  # the curve continues from the checkpoint, no step lost or repeated
    assert json.loads((run_dir / "report.json").read_text())["train"]["steps"] == 40


def test_time_limit_warning_checkpoints_and_requeues(slurm, tmp_path):
    """USR1 to the batch shell is what `#SBATCH --signal=B:USR1@300` sends before the time limit."""
    run_dir = tmp_path / "run"
    job = slurm.sbatch("--nodes=2", f"--output={tmp_path}/job-%j.out", str(REPO / "slurm" / "sa_sft.sbatch"),
                       "tiny", f"output_dir={run_dir}", "train.max_steps=40", "train.checkpoint_every=8",
                       env=job_env(), cwd=tmp_path)
    wait_for_checkpoint(run_dir, min_step=9, timeout=600)
    assert slurm.run("scancel", "--signal=USR1", "--batch", job).returncode == 0
    assert slurm.wait(job, timeout=900) == "COMPLETED", job_output(tmp_path / f"job-{job}.out")

    out = job_output(tmp_path / f"job-{job}.out")
    assert "time limit near; requeueing job" in (run_dir / "sa_sft.log").read_text()
    assert "restart 1" in (run_dir / "sa_sft.log").read_text(), out
    log = (run_dir / "train" / "train.log").read_text()
    stopped = int(log.split("SIGUSR1: stopped at step ")[1].split()[0])  # checkpointed on the signal...
    assert stopped >= 9
    assert f"resumed from step-{stopped:07d} at step {stopped}" in log  # ...and resumed there
    steps = [json.loads(line)["step"] for line in (run_dir / "train" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 41))
