"""The per-rank training loop: DeepSpeed ZeRO full-parameter SFT, top to bottom.

Launched once per rank (torchrun, the deepspeed launcher, srun, or a Ray actor):
    python -m sa_sft.train.trainer --config RUN/train/config.yaml --run-dir RUN

SIGTERM or SIGUSR1 (preemption, scancel, Slurm's time-limit warning) makes every rank finish
the current step, save a checkpoint and exit with EXIT_INTERRUPTED; a rerun resumes there.
"""
import argparse
import json
import logging
import math
import os
import shutil
import signal
import socket
import sys
import time
import warnings
from pathlib import Path

import torch

from sa_sft.config import load_config
from sa_sft.io import atomic_write_json, atomic_write_text, read_json, replace_dir
from sa_sft.models import resolve_model

log = logging.getLogger("sa_sft.train")

EXPORT_MARKER = "sa_sft_export.json"
INTERRUPTED_MARKER = "interrupted.json"
EXIT_INTERRUPTED = 75  # EX_TEMPFAIL: stopped on request, resumable
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopRequest:
    """Remembers a stop signal; ranks agree on it at step boundaries, so all save the same checkpoint."""

    def __init__(self):
        self.signal = 0
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum, _frame) -> None:
        self.signal = signum

    def agreed(self, device) -> int:
        import torch.distributed as dist

        flag = torch.tensor([self.signal], dtype=torch.int64, device=device)  # NCCL reduces GPU tensors only
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item())


def distributed_env() -> None:
    """torch.distributed reads RANK/WORLD_SIZE/LOCAL_RANK/MASTER_*; under plain srun map them from SLURM_*."""
    if "RANK" in os.environ or "SLURM_PROCID" not in os.environ:
        return
    os.environ["RANK"] = os.environ["SLURM_PROCID"]
    os.environ["WORLD_SIZE"] = os.environ["SLURM_NTASKS"]
    os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")


def lr_factor(step: int, warmup: int, total: int, schedule: str, min_ratio: float) -> float:
    """Multiplier of the peak lr at optimizer step `step` (0-based)."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "linear":
        return min_ratio + (1 - min_ratio) * (1 - progress)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def latest_checkpoint(ckpt_dir: Path) -> str | None:
    """The last complete checkpoint: `latest` is written (atomically, by rank 0) only after every
    rank finished saving, so a tag it names is whole."""
    latest = ckpt_dir / "latest"
    if not latest.exists():
        return None
    tag = latest.read_text().strip()
    return tag if (ckpt_dir / tag).is_dir() else None


def discard_incomplete_checkpoints(ckpt_dir: Path) -> list[str]:
    """Remove checkpoint directories newer than `latest`: saves cut short by a crash."""
    latest = latest_checkpoint(ckpt_dir) or ""
    partial = sorted(p.name for p in ckpt_dir.glob("step-*") if p.is_dir() and p.name > latest)
    for tag in partial:
        shutil.rmtree(ckpt_dir / tag, ignore_errors=True)
    return partial


def prune_checkpoints(ckpt_dir: Path, keep_last: int) -> None:
    tags = sorted(p.name for p in ckpt_dir.glob("step-*") if p.is_dir())
    keep = set(tags[-keep_last:]) | {latest_checkpoint(ckpt_dir)}
    for tag in tags:
        if tag not in keep:
            shutil.rmtree(ckpt_dir / tag, ignore_errors=True)


def trim_metrics(path: Path, upto_step: int) -> None:
    """On resume, drop metric lines past the checkpoint so the curve continues without repeats."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= upto_step]
    atomic_write_text(path, "".join(line + "\n" for line in kept))


def setup_logging(rank: int, log_file: Path) -> None:
    handlers = [logging.StreamHandler(sys.stderr)]
    if rank == 0:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_file))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, handlers=handlers,
                        format="%(asctime)s %(name)s [rank %(rank)s] %(message)s".replace("%(rank)s", str(rank)))


def freeze_parameters(model, tcfg) -> list[str]:
    """Freeze embeddings, the bottom N layers and/or named parameters (the layer-freezing baseline)."""
    import re

    import torch.nn as nn
    frozen_ids = set()
    if tcfg.freeze_embeddings:
        frozen_ids |= {id(p) for p in model.get_input_embeddings().parameters()}
    if tcfg.freeze_layers:
        layers = next((m for m in model.modules() if isinstance(m, nn.ModuleList)
                       and len(m) == model.config.num_hidden_layers), None)
        if layers is None or tcfg.freeze_layers > len(layers):
            raise SystemExit(f"error: train.freeze_layers={tcfg.freeze_layers} but the model has "
                             f"{model.config.num_hidden_layers} layers")
        for layer in layers[: tcfg.freeze_layers]:
            frozen_ids |= {id(p) for p in layer.parameters()}
    patterns = [re.compile(p) for p in tcfg.freeze_params]
    names = []
    for name, param in model.named_parameters():
        if id(param) in frozen_ids or any(p.search(name) for p in patterns):
            param.requires_grad_(False)
            names.append(name)
    if tcfg.freeze_params and not any(any(p.search(n) for p in patterns) for n in names):
        raise SystemExit(f"error: train.freeze_params {tcfg.freeze_params} matched no parameter")
    return names


def measure_peak_flops(dtype, device: str) -> float:
    """A dense matmul's FLOP/s on this device and thread count: the MFU denominator."""
    size = 8192 if device == "cuda" else 1024
    a = torch.randn(size, size, dtype=dtype, device=device)
    best = 0.0
    for _ in range(3):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        a @ a
        if device == "cuda":
            torch.cuda.synchronize()
        best = max(best, 2 * size**3 / (time.perf_counter() - t0))
    return best


def save_probe(engine, data, rank: int, path: Path) -> None:
    """Logits of the trained engine on one probe sequence, to check the exported folder against."""
    batch = data.micro_batches(0)[0]
    batch.pop("real_tokens"), batch.pop("num_samples")
    probe = {k: v[:1, :64].to(engine.device) for k, v in batch.items() if k != "labels"}
    if "attention_mask" in probe and probe["attention_mask"].dim() == 4:
        probe["attention_mask"] = batch["attention_mask"][:1, :, :64, :64].to(engine.device)
    with torch.no_grad():
        logits = engine(**probe).logits.float().cpu()
    if rank == 0:
        torch.save({"inputs": {k: v.cpu() for k, v in probe.items()}, "logits": logits}, path)


def export_model(engine, model, tokenizer, out_dir: Path, zero_stage: int, rank: int, info: dict) -> None:
    """Gather the full 16-bit weights and write a Hugging Face folder (safetensors) atomically."""
    if zero_stage == 3:
        state_dict = engine._zero3_consolidated_16bit_state_dict()
    else:
        state_dict = engine.module.state_dict() if rank == 0 else None
    if rank != 0:
        return
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True, max_shard_size="2GB")
    tokenizer.save_pretrained(tmp)
    if model.generation_config is not None:
        model.generation_config.save_pretrained(tmp)
    atomic_write_json(tmp / EXPORT_MARKER, info)
    replace_dir(tmp, out_dir)


def main() -> None:
    parser = argparse.ArgumentParser(description="one rank of the sa-sft DeepSpeed trainer")
    parser.add_argument("--config", required=True)
    parser.add_argument("--run-dir", required=True, type=Path)
    parser.add_argument("--local_rank", "--local-rank", type=int, help="set by the deepspeed launcher; LOCAL_RANK wins")
    args = parser.parse_args()

    # DeepSpeed calls collectives that torch deprecates, once per parameter per step.
    warnings.filterwarnings("ignore", message=r".*torch\.distributed\..* is deprecated.*")
    cfg = load_config(args.config)
    tcfg = cfg.train
    run_dir = args.run_dir
    train_dir = run_dir / "train"
    distributed_env()
    stop_request = StopRequest()

    import deepspeed
    import torch.distributed as dist
    from datasets import load_from_disk
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.integrations import HfDeepSpeedConfig

    from sa_sft.train.data import RankData
    from sa_sft.train.ds_config import build_ds_config

    deepspeed.init_distributed(dist_backend="gloo" if tcfg.device == "cpu" else "nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    setup_logging(rank, train_dir / "train.log")
    if tcfg.device == "cpu":
        torch.set_num_threads(tcfg.threads_per_rank)
    else:
        # Modulo: a launcher may give each rank only its own GPU (Ray, srun --gpus-per-task).
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
    # After set_device: with NCCL, object collectives run on the current GPU.
    placement = [None] * world
    dist.all_gather_object(placement, {"rank": rank, "host": os.environ.get("SLURMD_NODENAME") or socket.gethostname(),
                                       "ray_node": os.environ.get("SA_SFT_RAY_NODE_ID")})
    if rank == 0:
        log.info("ranks: %s", ", ".join(f"{p['rank']}@{p['host']}" for p in placement))

    # Data: this rank's shard of the mix.
    mix_manifest = read_json(run_dir / "mix" / "manifest.json")
    if mix_manifest["ranks"] != world:
        raise SystemExit(f"error: the mix was split for {mix_manifest['ranks']} ranks but {world} are running; "
                         f"rerun mix with train.ranks={world}")
    dataset = load_from_disk(str(run_dir / "mix" / mix_manifest["rank_dirs"][rank]))
    model_path = resolve_model(cfg.model.path)
    tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=cfg.model.trust_remote_code)
    data = RankData(dataset, tcfg.micro_batch_size, tcfg.gradient_accumulation_steps, cfg.seed, rank,
                    tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
                    packed=mix_manifest.get("packed", False))
    if data.steps_per_epoch == 0:
        raise SystemExit(f"error: {len(dataset)} samples per rank is less than one optimizer step "
                         f"(train.micro_batch_size x train.gradient_accumulation_steps)")
    total_steps = tcfg.max_steps or tcfg.epochs * data.steps_per_epoch

    # Model and engine: under ZeRO-3, HfDeepSpeedConfig makes from_pretrained partition at load.
    from transformers import AutoConfig
    model_config = AutoConfig.from_pretrained(model_path, trust_remote_code=cfg.model.trust_remote_code)
    ds_config = build_ds_config(tcfg, model_config.hidden_size)
    zero_stage = ds_config.get("zero_optimization", {}).get("stage", 0)
    hf_ds_config = HfDeepSpeedConfig(ds_config) if zero_stage == 3 else None  # noqa: F841 (must stay alive)
    dtype = torch.bfloat16 if tcfg.precision == "bf16" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype, trust_remote_code=cfg.model.trust_remote_code,
                                                 use_safetensors=True,
                                                 attn_implementation=tcfg.attn_implementation)
    model.config.use_cache = False
    frozen = freeze_parameters(model, tcfg)
    numel = lambda p: p.ds_numel if hasattr(p, "ds_numel") else p.numel()
    num_params = sum(numel(p) for p in model.parameters())
    trainable = sum(numel(p) for p in model.parameters() if p.requires_grad)
    if frozen:
        log.info("froze %d tensors; %.1fM of %.1fM parameters train", len(frozen), trainable / 1e6, num_params / 1e6)
    peak = tcfg.peak_tflops * 1e12 or measure_peak_flops(dtype, "cuda" if tcfg.device == "cuda" else "cpu")
    schedule = lambda step: lr_factor(step, tcfg.warmup_steps, total_steps, tcfg.lr_schedule, tcfg.min_lr_ratio)
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=[p for p in model.parameters() if p.requires_grad], config=ds_config,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule))
    log.info("training %s (%.1fM params) with ZeRO-%d on %d %s rank(s): %d samples/rank, %d steps/epoch, %d steps",
             model_path.name, num_params / 1e6, zero_stage, world, tcfg.device, len(dataset),
             data.steps_per_epoch, total_steps)

    # Resume from the latest complete checkpoint.
    ckpt_dir = train_dir / "checkpoints"
    metrics_path = train_dir / "metrics.jsonl"
    step = 0
    if rank == 0 and ckpt_dir.exists():
        for tag in discard_incomplete_checkpoints(ckpt_dir):
            log.warning("removed %s: its save was cut short (not named by %s)", ckpt_dir / tag, ckpt_dir / "latest")
    dist.barrier()
    if latest_checkpoint(ckpt_dir):
        tag = latest_checkpoint(ckpt_dir)
        _, client_state = engine.load_checkpoint(str(ckpt_dir), tag=tag)
        step = client_state["step"]
        rng = torch.load(ckpt_dir / tag / f"rng_rank{rank}.pt", weights_only=True)
        torch.set_rng_state(rng["torch"])
        log.info("resumed from %s at step %d", tag, step)
    if rank == 0:
        trim_metrics(metrics_path, step)
    writer = None
    if rank == 0 and tcfg.tensorboard:
        from torch.utils.tensorboard import SummaryWriter
        writer = SummaryWriter(str(train_dir / "tensorboard"), purge_step=step + 1)

    saved_at = -1

    def save_checkpoint(at_step: int) -> None:
        nonlocal saved_at
        if at_step == saved_at:
            return
        saved_at = at_step
        tag = f"step-{at_step:07d}"
        (ckpt_dir / tag).mkdir(parents=True, exist_ok=True)
        torch.save({"torch": torch.get_rng_state()}, ckpt_dir / tag / f"rng_rank{rank}.pt")
        engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state={"step": at_step}, save_latest=False)
        # Only once every rank has written its part does the checkpoint become the one to resume from.
        dist.barrier()
        if rank == 0:
            atomic_write_text(ckpt_dir / "latest", tag)
            prune_checkpoints(ckpt_dir, tcfg.keep_last)
        dist.barrier()

    progress = None
    if rank == 0:
        from tqdm import tqdm
        progress = tqdm(total=total_steps, initial=step, unit="step", desc="train", dynamic_ncols=True)
    device = engine.device
    engine.train()
    while step < total_steps:
        t0 = time.time()
        batches = data.micro_batches(step)
        data_wait = time.time() - t0
        stats = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, real tokens, samples
        for batch in batches:
            real_tokens, samples = batch.pop("real_tokens"), batch.pop("num_samples")
            loss = engine(**{k: v.to(device) for k, v in batch.items()}).loss
            engine.backward(loss)
            engine.step()
            stats += torch.tensor([loss.item(), real_tokens.sum().item(), samples], dtype=torch.float64, device=device)
        dist.all_reduce(stats)
        step_seconds = time.time() - t0
        step += 1
        if rank == 0 and (step % tcfg.log_every == 0 or step == total_steps):
            grad_norm = engine.get_global_grad_norm()
            record = {
                "step": step, "epoch": (step - 1) // data.steps_per_epoch,
                "loss": round(stats[0].item() / (len(batches) * world), 6),
                "lr": tcfg.learning_rate * schedule(step - 1),
                "grad_norm": float(grad_norm) if grad_norm is not None else None,
                "tokens_per_s": round(stats[1].item() / step_seconds, 1),
                "mfu": round(6 * num_params * stats[1].item() / step_seconds / (peak * world), 4),
                "samples_per_s": round(stats[2].item() / step_seconds, 2),
                "step_seconds": round(step_seconds, 3),
                "data_wait_s": round(data_wait, 4),
            }
            with open(metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")
            if writer:
                for key, value in record.items():
                    if key != "step" and value is not None:
                        writer.add_scalar(f"train/{key}", value, step)
            progress.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}")
        if progress:
            progress.update(1)
        if tcfg.checkpoint_every and step % tcfg.checkpoint_every == 0 and step < total_steps:
            save_checkpoint(step)
        stop = stop_request.agreed(device)
        if stop and step < total_steps:
            save_checkpoint(step)
            if rank == 0:
                atomic_write_json(train_dir / INTERRUPTED_MARKER, {"signal": signal.Signals(stop).name, "step": step})
                log.warning("%s: stopped at step %d of %d; checkpoint saved, a rerun resumes here",
                            signal.Signals(stop).name, step, total_steps)
            if progress:
                progress.close()
            sys.exit(EXIT_INTERRUPTED)
    if progress:
        progress.close()

    if writer:
        writer.close()
    save_checkpoint(step)
    save_probe(engine, data, rank, train_dir / "export_probe.pt")
    export_model(engine, model, tokenizer, train_dir / "final", zero_stage, rank,
                 {"steps": step, "num_params": num_params, "zero_stage": zero_stage, "ranks": world,
                  "placement": placement,
                  "precision": tcfg.precision, "base_model": str(model_path)})
    dist.barrier()
    log.info("exported %s", train_dir / "final")


if __name__ == "__main__":
    main()
