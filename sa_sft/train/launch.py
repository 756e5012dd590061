"""The train stage on one node: launch one trainer process per rank and check what they wrote."""
import logging
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

from sa_sft.config import Config, section_for_results
from sa_sft.errors import Interrupted, StageFailed, UserError
from sa_sft.io import atomic_write_text, read_json, read_jsonl
from sa_sft.models import cache_dir
from sa_sft.stage import open_stage, upstream_fingerprint
from sa_sft.train.trainer import EXPORT_MARKER, INTERRUPTED_MARKER, latest_checkpoint

log = logging.getLogger("sa_sft.train")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def trainer_env(cfg: Config) -> dict:
    """What the trainer processes need on top of the launching environment."""
    env = {
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        # DeepSpeed JIT-compiles its ops once; keep them in the project's cache, not ~/.cache.
        "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(cache_dir() / "torch_extensions")),
    }
    if cfg.train.device == "cpu":
        env.update({"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": str(cfg.train.threads_per_rank)})
    return env


def trainer_module(config_path: Path, run_dir: Path) -> list[str]:
    # Absolute: ranks may start in another working directory (Ray actors, other nodes).
    return ["-m", "sa_sft.train.trainer", "--config", str(config_path.resolve()), "--run-dir", str(run_dir.resolve())]


def srun_launch(cfg: Config, config_path: Path, run_dir: Path) -> tuple[list[str], dict]:
    """One srun task per rank over the allocation's nodes; rank 0's node hosts the rendezvous on the
    job's port; the trainer maps SLURM_PROCID/NTASKS/LOCALID to RANK/WORLD_SIZE/LOCAL_RANK."""
    from sa_sft.cluster.slurm import current_allocation, job_ports, srun_command

    alloc = current_allocation()
    ranks, nodes = cfg.train.ranks, len(alloc.nodes)
    if ranks % nodes:
        raise UserError(f"config key train.ranks={ranks} does not divide evenly over the job's {nodes} nodes")
    per_node = ranks // nodes
    port = cfg.train.master_port or job_ports(alloc.job_id, cfg.cluster.port_base).master
    cmd = srun_command(alloc.nodes, tasks_per_node=per_node, overlap=False,
                       cpus_per_task=max(1, alloc.cpus_per_node // per_node), extra=("--label",))
    return cmd + [sys.executable, *trainer_module(config_path, run_dir)], {
        "MASTER_ADDR": alloc.head_address, "MASTER_PORT": str(port)}


def launch_command(cfg: Config, config_path: Path, run_dir: Path) -> list[str]:
    """The single-node launchers: torchrun (default) or the deepspeed launcher."""
    tcfg = cfg.train
    port = tcfg.master_port or free_port()
    worker = trainer_module(config_path, run_dir)
    if tcfg.launcher == "deepspeed":
        # The deepspeed launcher counts CPU "devices" as NUMA nodes; --num_gpus sets the rank count.
        return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(tcfg.ranks),
                "--master_port", str(port), "--module", *worker[1:]]
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(tcfg.ranks),
            "--master_addr", "127.0.0.1", "--master_port", str(port), *worker]


def check_export(final_dir: Path, probe_path: Path, cfg: Config) -> float:
    """Reload the exported folder with transformers and compare its logits with the training
    engine's on the probe sequence; a mismatch means a broken export, so it fails the stage."""
    import torch
    from transformers import AutoModelForCausalLM

    probe = torch.load(probe_path, weights_only=True)
    dtype = torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(final_dir, dtype=dtype, attn_implementation=cfg.train.attn_implementation,
                                                 trust_remote_code=cfg.model.trust_remote_code, use_safetensors=True).eval()
    with torch.no_grad():
        logits = model(**probe["inputs"]).logits.float()
    error = (logits - probe["logits"]).abs().max().item()
    scale = probe["logits"].abs().max().item()
    tolerance = (0.05 if dtype == torch.bfloat16 else 1e-3) * max(1.0, scale)
    if not error <= tolerance:
        raise UserError(f"train: the exported model in {final_dir} does not reproduce the trained engine's logits "
                        f"(max error {error:.4g} > {tolerance:.3g}); the export is broken")
    log.info("train: export checked: transformers reload matches the engine (max logit error %.2e)", error)
    return round(error, 6)


def run_forwarding_signals(cmd: list[str], env: dict, forward_as: int) -> tuple[int, list[str]]:
    """Run the launcher; SIGTERM/SIGUSR1 sent to sa-sft reach it as `forward_as`, a signal it relays
    to every rank, which checkpoints and stops. Returns the exit code and the signals seen."""
    proc = subprocess.Popen(cmd, env=env)
    seen: list[str] = []

    def forward(signum, _frame):
        seen.append(signal.Signals(signum).name)
        proc.send_signal(forward_as)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        return proc.wait(), seen
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def run_ranks(cfg: Config, config_path: Path, run_dir: Path) -> tuple[int, list[str]]:
    env = trainer_env(cfg)
    if cfg.train.launcher == "ray":
        from sa_sft.train.ray_ranks import run_ranks_on_ray
        return run_ranks_on_ray(cfg, trainer_module(config_path, run_dir), env)
    # torchrun and the deepspeed launcher relay SIGTERM to their ranks; srun kills the step on
    # SIGTERM but relays SIGUSR1.
    forward_as = signal.SIGTERM
    if cfg.train.launcher == "srun":
        cmd, rendezvous = srun_launch(cfg, config_path, run_dir)
        env.update(rendezvous)
        forward_as = signal.SIGUSR1
    else:
        cmd = launch_command(cfg, config_path, run_dir)
    log.info("train: launching %d rank(s): %s", cfg.train.ranks, " ".join(cmd))
    return run_forwarding_signals(cmd, {**os.environ, **env}, forward_as)


def train_inputs(cfg: Config, run_dir: Path) -> dict:
    return {"mix": upstream_fingerprint(run_dir, "mix"), "model": cfg.model.path, "seed": cfg.seed,
            "train": section_for_results(cfg.train)}


def run_train(cfg: Config, run_dir: Path, overwrite: bool = False) -> dict:
    stage = open_stage(run_dir, "train", train_inputs(cfg, run_dir), overwrite)
    if stage is None:
        return read_json(run_dir / "train" / "manifest.json")
    config_path = stage.dir / "config.yaml"
    atomic_write_text(config_path, cfg.to_yaml())
    interrupted = stage.dir / INTERRUPTED_MARKER
    interrupted.unlink(missing_ok=True)
    returncode, signals = run_ranks(cfg, config_path, run_dir)
    marker = stage.dir / "final" / EXPORT_MARKER
    if returncode != 0 and interrupted.exists():
        stop = read_json(interrupted)
        raise Interrupted(f"train: stopped by {stop['signal']} at step {stop['step']} with a checkpoint; "
                          f"rerun the same command to resume", signals[0] if signals else stop["signal"])
    if returncode != 0 and signals and not marker.exists():
        raise Interrupted(f"train: stopped by {signals[0]} before a new checkpoint; rerun the same command to "
                          f"resume from the last one", signals[0])
    if returncode != 0:
        # A known DeepSpeed/gloo quirk: a rank can abort at exit after all work is saved. Trust the outputs.
        if not marker.exists():
            resume = latest_checkpoint(stage.dir / "checkpoints") or "the start (no checkpoint yet)"
            raise StageFailed(f"train: a training rank failed (launcher exit {returncode}; the launcher's summary "
                              f"above names the rank); see {stage.dir / 'train.log'}; rerun to resume from {resume}")
        log.warning("train: the launcher exited %d after the export completed; outputs verified, continuing",
                    returncode)
    export = read_json(marker)
    probe_error = check_export(stage.dir / "final", stage.dir / "export_probe.pt", cfg)
    metrics = read_jsonl(stage.dir / "metrics.jsonl")
    return stage.finish(steps=export["steps"], num_params=export["num_params"], zero_stage=export["zero_stage"],
                        ranks=export["ranks"], final_loss=metrics[-1]["loss"] if metrics else None,
                        first_loss=metrics[0]["loss"] if metrics else None,
                        tokens_per_s=round(sum(m["tokens_per_s"] for m in metrics) / max(len(metrics), 1), 1),
                        mfu=round(sum(m["mfu"] for m in metrics) / max(len(metrics), 1), 4),
                        export_max_logit_error=probe_error,
                        placement=export.get("placement"), launcher_exit_code=returncode)
