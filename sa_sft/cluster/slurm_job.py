"""`sa-sft slurm STAGE`: the stages inside one Slurm job, on every node of its allocation.

    check     every node sees the run directory, runs the same Python environment, has the job's ports free
    generate  a Ray cluster over the allocation (head on the first node), the engines spread over it
    train     mix, then one srun task per rank, rendezvous on the first node at the job's port
    evaluate  evaluate and write the report (on the first node)
    run       all of the above in order

Each is safe to resubmit: finished stages are skipped, an interrupted one resumes. Slurm's
time-limit warning (`#SBATCH --signal=B:USR1@...`) checkpoints the trainer and requeues the job.
"""
import dataclasses
import logging
import os
import secrets
from pathlib import Path

from sa_sft.cluster.slurm import Allocation, check_probes, current_allocation, job_ports, probe_nodes, requeue
from sa_sft.config import Config
from sa_sft.errors import Interrupted
from sa_sft.io import atomic_write_text

log = logging.getLogger("sa_sft.cluster")

SLURM_STAGES = {
    "check": [],
    "generate": ["generate"],
    "train": ["mix", "train"],
    "evaluate": ["evaluate"],
    "run": ["generate", "mix", "train", "evaluate"],
}


def check_nodes(alloc: Allocation, cfg: Config, run_dir: Path) -> None:
    token = secrets.token_hex(16)
    token_file = run_dir / ".slurm_probe"
    atomic_write_text(token_file, token)
    try:
        check_probes(probe_nodes(alloc, str(run_dir), token, job_ports(alloc.job_id, cfg.cluster.port_base)),
                     str(run_dir))
    finally:
        token_file.unlink(missing_ok=True)
    log.info("slurm: job %s on %d node(s) %s (%d CPUs each%s): run directory shared, one Python "
             "environment, ports free", alloc.job_id, len(alloc.nodes), ",".join(alloc.nodes), alloc.cpus_per_node,
             f", restart {alloc.restart_count}" if alloc.restart_count else "")


def generate_finished(run_dir: Path) -> bool:
    return (run_dir / "generate" / "manifest.json").exists()


def run_slurm_job(command: str, cfg: Config, overwrite: bool = False) -> None:
    from sa_sft.pipeline import log_to_file

    alloc = current_allocation()
    # Every node must agree on the path: make it absolute against the job's working directory.
    cfg = dataclasses.replace(cfg, output_dir=str(Path(cfg.output_dir).resolve()))
    run_dir = Path(cfg.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    with log_to_file(run_dir / "sa_sft.log"):
        run_on_allocation(alloc, command, cfg, run_dir, overwrite)


def run_on_allocation(alloc: Allocation, command: str, cfg: Config, run_dir: Path, overwrite: bool) -> None:
    from sa_sft.cluster.ray_cluster import ray_on_slurm
    from sa_sft.pipeline import run_stages

    check_nodes(alloc, cfg, run_dir)
    stages = SLURM_STAGES[command]
    try:
        if "generate" in stages:
            if generate_finished(run_dir) and not overwrite:
                run_stages(cfg, ["generate"], overwrite)  # skips, or refuses a changed config, without Ray
            else:
                with ray_on_slurm(alloc, cfg.cluster, run_dir / "logs") as address:
                    run_stages(dataclasses.replace(cfg, cluster=dataclasses.replace(cfg.cluster, ray_address=address)),
                               ["generate"], overwrite)
        rest = [s for s in stages if s != "generate"]
        if rest:
            cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, launcher="srun"))
            run_stages(cfg, rest, overwrite)
    except Interrupted as stop:
        if stop.signal_name == "SIGUSR1" and os.environ.get("SLURM_JOB_ID"):
            log.warning("slurm: time limit near; requeueing job %s to resume", alloc.job_id)
            requeue(alloc.job_id)
        raise
