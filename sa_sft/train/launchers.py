"""Starting the ranks: one trainer process per rank, by torchrun or the deepspeed launcher on this
node, by srun over a Slurm allocation, or as Ray actors (ray_ranks.py); stop signals relayed."""
import json
import logging
import os
import signal
import subprocess
import sys
import time

from sa_sft import console, signals
from sa_sft.cache import torch_extensions_dir
from sa_sft.cluster.ports import free_port
from sa_sft.config import Config
from sa_sft.errors import UserError
from sa_sft.rundir import RunDir
from sa_sft.train.progress import Follower

log = logging.getLogger("sa_sft.train")


def trainer_env(cfg: Config) -> dict:
    """What the trainer processes need on top of the launching environment."""
    env = {
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        # DeepSpeed JIT-compiles its ops once; keep them in the project's cache, not ~/.cache.
        "TORCH_EXTENSIONS_DIR": torch_extensions_dir(),
        # Quiet mode: each rank's output goes to RUN/logs/train-rank-R.log (Ray actors do not inherit it).
        console.VERBOSE_ENV: "1" if console.verbose() else "0",
    }
    if cfg.train.device == "cpu":
        env.update({"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": str(cfg.train.threads_per_rank)})
    return env


def trainer_module(run: RunDir) -> list[str]:
    # Absolute: ranks may start in another working directory (Ray actors, other nodes).
    return ["-m", "sa_sft.train.trainer", "--config", str(run.train_config.resolve()), "--run-dir",
            str(run.root.resolve())]


def srun_launch(cfg: Config, run: RunDir) -> tuple[list[str], dict]:
    """One srun task per rank over the allocation's nodes; rank 0's node hosts the rendezvous on the
    job's port; the trainer maps SLURM_PROCID/NTASKS/LOCALID to RANK/WORLD_SIZE/LOCAL_RANK."""
    from sa_sft.cluster.ports import job_ports
    from sa_sft.cluster.slurm import current_allocation, srun_command

    alloc = current_allocation()
    ranks, nodes = cfg.train.ranks, len(alloc.nodes)
    if ranks % nodes:
        raise UserError(f"config key train.ranks={ranks} does not divide evenly over the job's {nodes} nodes")
    per_node = ranks // nodes
    port = cfg.train.master_port or job_ports(alloc.job_id, cfg.cluster.port_base).master
    cmd = srun_command(alloc.nodes, tasks_per_node=per_node, overlap=False,
                       cpus_per_task=max(1, alloc.cpus_per_node // per_node), extra=("--label",))
    return cmd + [sys.executable, *trainer_module(run)], {
        "MASTER_ADDR": alloc.head_address, "MASTER_PORT": str(port)}


def launch_command(cfg: Config, run: RunDir) -> list[str]:
    """The single-node launchers: torchrun (default) or the deepspeed launcher."""
    tcfg = cfg.train
    port = tcfg.master_port or free_port()
    worker = trainer_module(run)
    if tcfg.launcher == "deepspeed":
        # The deepspeed launcher counts CPU "devices" as NUMA nodes; --num_gpus sets the rank count.
        return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(tcfg.ranks),
                "--master_port", str(port), "--module", *worker[1:]]
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(tcfg.ranks),
            "--master_addr", "127.0.0.1", "--master_port", str(port), *worker]


def run_forwarding_signals(cmd: list[str], env: dict, forward_as: int, follower: Follower) -> tuple[int, list[str]]:
    """Run the launcher; SIGTERM/SIGUSR1 sent to sa-sft reach it as `forward_as`, a signal it relays
    to every rank, which checkpoints and stops. Returns the exit code and the signals seen."""
    proc = subprocess.Popen(cmd, env=env)
    seen: list[str] = []

    def forward(signum, _frame):
        seen.append(signals.name(signum))
        proc.send_signal(forward_as)

    with signals.handled(forward):
        while proc.poll() is None:
            follower.poll()
            time.sleep(0.5)
        follower.close()
        return proc.returncode, seen


def run_ranks(cfg: Config, run: RunDir) -> tuple[int, list[str]]:
    """Start every rank and wait for them; returns the launcher's exit code and the stop signals relayed."""
    env = trainer_env(cfg)
    if cfg.train.launcher == "ray":
        from sa_sft.train.ray_ranks import run_ranks_on_ray
        return run_ranks_on_ray(cfg, trainer_module(run), env, Follower(run))
    # torchrun and the deepspeed launcher relay SIGTERM to their ranks; srun kills the step on
    # SIGTERM but relays SIGUSR1.
    forward_as = signal.SIGTERM
    if cfg.train.launcher == "srun":
        cmd, rendezvous = srun_launch(cfg, run)
        env.update(rendezvous)
        forward_as = signal.SIGUSR1
    else:
        cmd = launch_command(cfg, run)
    log.info("train: launching %d rank(s): %s", cfg.train.ranks, " ".join(cmd))
    return run_forwarding_signals(cmd, {**os.environ, **env}, forward_as, Follower(run))


def parse_probe_lines(stdout: str) -> list[dict]:
    """The JSON reports of an srun step's tasks (`--label` prefixes each line with `TASK: `)."""
    reports = []
    for line in stdout.splitlines():
        _, _, rest = line.partition(": ") if not line.startswith("{") else ("", "", line)
        if rest.startswith("{"):
            reports.append(json.loads(rest))
    return reports


def dry_run(cfg: Config, run: RunDir) -> dict:
    """How the ranks would start, per rank: node, devices, environment, command. With srun and Ray the
    ranks are really placed (an srun step, Ray actors) and report what they see; no trainer starts."""
    env = trainer_env(cfg)
    worker = trainer_module(run)
    launcher = cfg.train.launcher
    if launcher == "ray":
        from sa_sft.train.ray_ranks import dry_run_on_ray
        return {"launcher": launcher, "env": env, "ranks": dry_run_on_ray(cfg, worker, env)}
    if launcher == "srun":
        cmd, rendezvous = srun_launch(cfg, run)
        step = cmd[: cmd.index(sys.executable)]
        probe = subprocess.run(step + [sys.executable, "-m", "sa_sft.cluster.node", "whoami", "--role", "rank"],
                               env={**os.environ, **env, **rendezvous}, capture_output=True, text=True, timeout=300)
        if probe.returncode != 0:
            raise UserError(f"train: the dry-run srun step failed (exit {probe.returncode}): "
                            f"{(probe.stderr.strip().splitlines() or ['no output'])[-1]}")
        ranks = sorted(parse_probe_lines(probe.stdout), key=lambda r: int(r["env"]["RANK"]))
        return {"launcher": launcher, "command": cmd, "env": {**env, **rendezvous},
                "ranks": [{**r, "command": [sys.executable, *worker]} for r in ranks]}
    cmd = launch_command(cfg, run)
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    from sa_sft.cluster.slurm import device_of
    from sa_sft.hardware import node_name
    ranks = [{"rank": r, "node": node_name(), "env": {"RANK": str(r), "LOCAL_RANK": str(r),
                                                      "WORLD_SIZE": str(cfg.train.ranks)},
              "gpu": (device_of(r, visible) if visible else str(r)) if cfg.train.device == "cuda" else None}
             for r in range(cfg.train.ranks)]
    return {"launcher": launcher, "command": cmd, "env": env, "ranks": ranks}
