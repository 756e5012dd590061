"""`sa-sft slurm STEP`: the stages inside one Slurm job, on every node of its allocation.

    check     every node sees the run directory, runs the same Python environment, has the job's ports free
    generate  a Ray cluster over the allocation (head on the first node), the engines spread over it
    train     mix, then one srun task per rank, rendezvous on the first node at the job's port
    evaluate  evaluate and write the report (on the first node)
    run       all of the above in order

Which stage runs how comes from the registry (`StageSpec.slurm_step`, `.on_slurm`). Each step is
safe to resubmit: finished stages are skipped, an interrupted one resumes. Slurm's time-limit
warning (`#SBATCH --signal=B:USR1@...`) checkpoints the trainer and requeues the job.
"""
import dataclasses
import itertools
import logging
import os
import secrets
from pathlib import Path

from sa_sft.cluster.ports import job_ports
from sa_sft.cluster.slurm import Allocation, check_probes, current_allocation, probe_nodes, requeue
from sa_sft.config import Config
from sa_sft.errors import Interrupted
from sa_sft.io import atomic_write_text
from sa_sft.pipeline.runner import log_to_file, run_stages
from sa_sft.pipeline.stages import SLURM_STEPS, selected
from sa_sft.rundir import RunDir

log = logging.getLogger("sa_sft.cluster")


def check_nodes(alloc: Allocation, cfg: Config, run: RunDir) -> None:
    token = secrets.token_hex(16)
    atomic_write_text(run.slurm_probe, token)
    try:
        check_probes(probe_nodes(alloc, str(run.root), token, job_ports(alloc.job_id, cfg.cluster.port_base)),
                     str(run.root))
    finally:
        run.slurm_probe.unlink(missing_ok=True)
    log.info("slurm: job %s on %d node(s) %s (%d CPUs each%s): run directory shared, one Python "
             "environment, ports free", alloc.job_id, len(alloc.nodes), ",".join(alloc.nodes), alloc.cpus_per_node,
             f", restart {alloc.restart_count}" if alloc.restart_count else "")


def run_slurm_job(step: str, cfg: Config, overwrite: bool = False) -> None:
    alloc = current_allocation()
    # Every node must agree on the path: make it absolute against the job's working directory. The
    # ranks are srun tasks over the allocation, whichever stage this step runs.
    cfg = dataclasses.replace(cfg, output_dir=str(Path(cfg.output_dir).resolve()),
                              train=dataclasses.replace(cfg.train, launcher="srun"))
    run = RunDir(cfg.output_dir).create()
    with log_to_file(run.log):
        run_on_allocation(alloc, step, cfg, run, overwrite)


def run_on_allocation(alloc: Allocation, step: str, cfg: Config, run: RunDir, overwrite: bool) -> None:
    from sa_sft.cluster.ray_cluster import ray_on_slurm

    check_nodes(alloc, cfg, run)
    try:
        # Consecutive stages that run on Ray share one Ray cluster over the allocation; the others run
        # from this (the first) node, the trainer's ranks as srun tasks.
        for on_ray, group in itertools.groupby(selected(SLURM_STEPS[step]), key=lambda s: s.on_slurm == "ray"):
            names = [s.name for s in group]
            if not on_ray or (all(run.finished(name) for name in names) and not overwrite):
                run_stages(cfg, names, overwrite)  # finished: skips, or refuses a changed config, without Ray
                continue
            with ray_on_slurm(alloc, cfg.cluster, run) as address:
                run_stages(dataclasses.replace(cfg, cluster=dataclasses.replace(cfg.cluster, ray_address=address)),
                           names, overwrite)
    except Interrupted as stop:
        # USR1: Slurm's warning before the time limit; TIME_LIMIT: the trainer stopped in time by itself.
        if stop.signal_name in ("SIGUSR1", "TIME_LIMIT") and os.environ.get("SLURM_JOB_ID"):
            log.warning("slurm: time limit near; requeueing job %s to resume", alloc.job_id)
            requeue(alloc.job_id)
        raise


def dry_run_slurm(step: str, cfg: Config) -> dict:
    """`sa-sft slurm STEP --dry-run`: check the nodes, then place everything the step would start, for
    real but with probes in place of the work: the raylets' srun step (what CPUs and GPUs each node's
    Ray gets), the Ray cluster over the allocation with an engine probe where each engine would run,
    and the trainer's srun step (what each rank would see). Trains and generates nothing."""
    import subprocess
    import sys

    from sa_sft.cluster.ray_cluster import ray_on_slurm, ray_session, raylet_srun
    from sa_sft.train.launchers import dry_run as ranks_dry_run, parse_probe_lines

    alloc = current_allocation()
    cfg = dataclasses.replace(cfg, output_dir=str(Path(cfg.output_dir).resolve()),
                              train=dataclasses.replace(cfg.train, launcher="srun"))
    run = RunDir(cfg.output_dir).create()
    check_nodes(alloc, cfg, run)
    specs = selected(SLURM_STEPS[step])
    report = {"job": alloc.job_id, "nodes": alloc.nodes, "addresses": alloc.addresses,
              "stages": [s.name for s in specs]}
    if any(s.on_slurm == "ray" for s in specs):
        step_cmd = raylet_srun(alloc, alloc.nodes)
        probe = subprocess.run(step_cmd + [sys.executable, "-m", "sa_sft.cluster.node", "whoami", "--role", "raylet"],
                               capture_output=True, text=True, timeout=300)
        report["raylets"] = {"command": step_cmd, "nodes": parse_probe_lines(probe.stdout)}
        with ray_on_slurm(alloc, cfg.cluster, run) as address, ray_session(address) as own_machine:
            # Imported only now: Ray reads the job's auth token (set by ray_on_slurm) when first imported.
            from sa_sft.engines.pool import dry_run as engines_dry_run
            report["engines"] = engines_dry_run(cfg.generate, own_machine)
    if any(s.on_slurm == "ranks" for s in specs):
        report["train"] = ranks_dry_run(cfg, run)
    return report
