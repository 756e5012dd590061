"""The train stage on one node: launch one trainer process per rank and check what they wrote."""
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

from sa_sft.config import Config, section_for_results
from sa_sft.errors import UserError
from sa_sft.io import atomic_write_text, read_json, read_jsonl
from sa_sft.models import cache_dir
from sa_sft.stage import open_stage, upstream_fingerprint
from sa_sft.train.trainer import EXPORT_MARKER

log = logging.getLogger("sa_sft.train")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def trainer_env(cfg: Config) -> dict:
    env = dict(os.environ)
    env.update({
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        # DeepSpeed JIT-compiles its ops once; keep them in the project's cache, not ~/.cache.
        "TORCH_EXTENSIONS_DIR": env.get("TORCH_EXTENSIONS_DIR", str(cache_dir() / "torch_extensions")),
    })
    if cfg.train.device == "cpu":
        env.update({"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": str(cfg.train.threads_per_rank)})
    return env


def launch_command(cfg: Config, config_path: Path, run_dir: Path) -> list[str]:
    tcfg = cfg.train
    port = tcfg.master_port or free_port()
    worker = ["-m", "sa_sft.train.trainer", "--config", str(config_path), "--run-dir", str(run_dir)]
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
                                                 trust_remote_code=cfg.model.trust_remote_code).eval()
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


def train_inputs(cfg: Config, run_dir: Path) -> dict:
    return {"mix": upstream_fingerprint(run_dir, "mix"), "model": cfg.model.path, "seed": cfg.seed,
            "train": section_for_results(cfg.train)}


def run_train(cfg: Config, run_dir: Path, overwrite: bool = False) -> dict:
    stage = open_stage(run_dir, "train", train_inputs(cfg, run_dir), overwrite)
    if stage is None:
        return read_json(run_dir / "train" / "manifest.json")
    config_path = stage.dir / "config.yaml"
    atomic_write_text(config_path, cfg.to_yaml())
    cmd = launch_command(cfg, config_path, run_dir)
    log.info("train: launching %d rank(s): %s", cfg.train.ranks, " ".join(cmd))
    result = subprocess.run(cmd, env=trainer_env(cfg))
    marker = stage.dir / "final" / EXPORT_MARKER
    if result.returncode != 0:
        # A known DeepSpeed/gloo quirk: a rank can abort at exit after all work is saved. Trust the outputs.
        if not marker.exists():
            raise UserError(f"train: the trainer failed (exit {result.returncode}); see {stage.dir / 'train.log'}; "
                            f"rerun to resume from the last checkpoint")
        log.warning("train: the launcher exited %d after the export completed; outputs verified, continuing",
                    result.returncode)
    export = read_json(marker)
    probe_error = check_export(stage.dir / "final", stage.dir / "export_probe.pt", cfg)
    metrics = read_jsonl(stage.dir / "metrics.jsonl")
    return stage.finish(steps=export["steps"], num_params=export["num_params"], zero_stage=export["zero_stage"],
                        ranks=export["ranks"], final_loss=metrics[-1]["loss"] if metrics else None,
                        first_loss=metrics[0]["loss"] if metrics else None,
                        tokens_per_s=round(sum(m["tokens_per_s"] for m in metrics) / max(len(metrics), 1), 1),
                        mfu=round(sum(m["mfu"] for m in metrics) / max(len(metrics), 1), 4),
                        export_max_logit_error=probe_error,
                        launcher_exit_code=result.returncode)
