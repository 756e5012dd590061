"""Full-parameter SFT with DeepSpeed ZeRO, one rank of it, as a recipe that reads top to bottom:

    recipe = SFTRecipe(cfg, run)
    recipe.setup()      distributed, data, model and engine, resume from the latest checkpoint
    recipe.train()      the steps, metrics, checkpoints (CheckpointPolicy), a stop signal honoured
    recipe.export()     the Hugging Face folder, then every tensor checked against the engine's

SIGTERM or SIGUSR1 (preemption, scancel, Slurm's time-limit warning) makes every rank finish
the current step, save a checkpoint and exit with EXIT_INTERRUPTED; a rerun resumes there.
The parts without DeepSpeed in them (lr schedule, checkpoint policy and resume decision,
freezing, the export comparison) live in their own functions and are tested alone.
"""
import json
import logging
import math
import os
import shutil
import sys
import time

import torch

from sa_sft import signals
from sa_sft.chat import pad_token_id
from sa_sft.console import OwnRecords
from sa_sft.cluster.slurm import job_deadline, rank_env_from_slurm
from sa_sft.config import Config, TrainConfig, train_seed
from sa_sft.errors import StageFailed, UserError
from sa_sft.hardware import node_name, torch_dtype
from sa_sft.io import atomic_write_json, read_json
from sa_sft.models import resolve_model
from sa_sft.rundir import RunDir
from sa_sft.train import checkpoints
from sa_sft.train.checkpoints import CheckpointPolicy, near_deadline

log = logging.getLogger("sa_sft.train")

EXIT_INTERRUPTED = 75  # EX_TEMPFAIL: stopped on request, resumable
TIME_LIMIT = "TIME_LIMIT"  # what a stop before the Slurm job's time limit is called (like Slurm's USR1)


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


class StopRequest:
    """Remembers a stop signal; ranks agree on it at step boundaries, so all save the same checkpoint."""

    def __init__(self):
        self.signal = 0
        signals.install(self._handle)

    def _handle(self, signum, _frame) -> None:
        self.signal = signum


def agree(device, *flags: int) -> list[int]:
    """The maximum of each flag over the ranks: what one rank saw (a signal, rank 0's clock), all act on."""
    import torch.distributed as dist

    tensor = torch.tensor(flags, dtype=torch.int64, device=device)  # NCCL reduces GPU tensors only
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return [int(x) for x in tensor.tolist()]


def cuda_device(local_rank: int, visible: int) -> int:
    """The device index a rank uses: its LOCAL_RANK among the GPUs it sees (one when the launcher
    gives each rank its own, as Ray does)."""
    if visible < 1:
        raise UserError("train.device=cuda but this rank sees no GPU (CUDA_VISIBLE_DEVICES, the launcher's GPU request)")
    return local_rank % visible


def setup_logging(rank: int, log_file) -> None:
    handlers = [logging.StreamHandler(sys.stderr)]
    if rank == 0:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        own = logging.FileHandler(log_file)
        own.addFilter(OwnRecords(True))  # sa-sft's lines, which the train stage echoes to the terminal
        handlers.append(own)
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, handlers=handlers,
                        format="%(asctime)s %(name)s [rank %(rank)s] %(message)s".replace("%(rank)s", str(rank)))


def loss_divisor(step_loss_tokens: int, world: int, grad_accum: int) -> float:
    """What each micro-batch's summed token loss is divided by. DeepSpeed divides every micro-batch's
    loss by grad_accum and averages gradients over the ranks, so dividing the sum by
    step_loss_tokens / (world x grad_accum) makes the step's gradient that of the mean over all
    of its loss tokens: every token weighs the same, whatever else landed in its micro-batch."""
    return max(step_loss_tokens, 1) / (world * grad_accum)


def check_rank_rows(rows_per_rank: int, tcfg: TrainConfig) -> None:
    """A rank needs at least one optimizer step of samples (checked by the train stage before launching, too)."""
    per_step = tcfg.micro_batch_size * tcfg.gradient_accumulation_steps
    if rows_per_rank < per_step:
        raise UserError(f"the mix holds {rows_per_rank} samples per rank, less than one optimizer step "
                        f"(train.micro_batch_size x train.gradient_accumulation_steps = {per_step}); "
                        "lower them or add task data")


class SFTRecipe:
    def __init__(self, cfg: Config, run: RunDir):
        self.cfg, self.tcfg, self.run = cfg, cfg.train, run
        self.stop = StopRequest()
        self.step = 0

    # ---- setup
    def setup(self) -> None:
        self.setup_distributed()
        self.setup_data()
        self.setup_model()
        self.resume()

    def setup_distributed(self) -> None:
        import deepspeed
        import torch.distributed as dist

        os.environ.update(rank_env_from_slurm(os.environ))
        if self.tcfg.device == "cpu":
            torch.set_num_threads(self.tcfg.threads_per_rank)
        else:
            # Before the process group: NCCL binds each rank's communicator to its current device. Modulo:
            # a launcher may give each rank only its own GPU (Ray actors, srun --gpus-per-task).
            torch.cuda.set_device(cuda_device(int(os.environ.get("LOCAL_RANK", 0)), torch.cuda.device_count()))
        deepspeed.init_distributed(dist_backend="gloo" if self.tcfg.device == "cpu" else "nccl")
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        setup_logging(self.rank, self.run.train_log)
        self.placement = [None] * self.world
        dist.all_gather_object(self.placement, {"rank": self.rank, "host": node_name(),
                                                "ray_node": os.environ.get("SA_SFT_RAY_NODE_ID")})
        if self.rank == 0:
            log.info("ranks: %s", ", ".join(f"{p['rank']}@{p['host']}" for p in self.placement))

    def setup_data(self) -> None:
        """This rank's shard of the mix, in an order that is a pure function of (seed, epoch, rank)."""
        from datasets import load_from_disk
        from transformers import AutoTokenizer

        from sa_sft.train.data import RankData

        mix = self.run.manifest("mix")
        if mix["ranks"] != self.world:
            raise UserError(f"the mix was split for {mix['ranks']} ranks but {self.world} are running; "
                            f"rerun mix with train.ranks={self.world}")
        check_rank_rows(mix["rows_per_rank"], self.tcfg)
        self.dataset = load_from_disk(str(self.run.rank_data(self.rank)))
        self.model_path = resolve_model(self.cfg.model.path)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path, trust_remote_code=self.cfg.model.trust_remote_code)
        self.data = RankData(self.dataset, self.tcfg.micro_batch_size, self.tcfg.gradient_accumulation_steps,
                             train_seed(self.cfg), self.rank, pad_token_id(self.tokenizer), packed=mix.get("packed", False),
                             varlen=self.tcfg.attn_implementation == "flash_attention_2")
        self.total_steps = self.tcfg.max_steps or self.tcfg.epochs * self.data.steps_per_epoch
        self.policy = CheckpointPolicy(self.tcfg.checkpoint_every, self.total_steps,
                                       every_seconds=60 * self.tcfg.checkpoint_every_minutes)
        # Inside a Slurm job with a time limit, rank 0 stops in time to save (it also honours USR1).
        self.deadline = job_deadline() if self.rank == 0 else None

    def setup_model(self) -> None:
        """Under ZeRO-3, HfDeepSpeedConfig makes from_pretrained partition the weights as they load."""
        import deepspeed
        from transformers import AutoConfig, AutoModelForCausalLM
        from transformers.integrations import HfDeepSpeedConfig

        from sa_sft.train.ds_config import build_ds_config
        from sa_sft.train.freezing import freeze_parameters

        tcfg, trust = self.tcfg, self.cfg.model.trust_remote_code
        model_config = AutoConfig.from_pretrained(self.model_path, trust_remote_code=trust)
        ds_config = build_ds_config(tcfg, model_config.hidden_size)
        self.zero_stage = ds_config.get("zero_optimization", {}).get("stage", 0)
        self._hf_ds_config = HfDeepSpeedConfig(ds_config) if self.zero_stage == 3 else None  # must stay alive
        dtype = torch_dtype(tcfg.precision)
        model = AutoModelForCausalLM.from_pretrained(self.model_path, dtype=dtype, trust_remote_code=trust,
                                                     use_safetensors=True, attn_implementation=tcfg.attn_implementation)
        model.config.use_cache = False
        if tcfg.lora_rank:
            from sa_sft.train.lora import add_adapters
            model = add_adapters(model, tcfg)
        if tcfg.gradient_checkpointing:
            # Non-reentrant: works with ZeRO-3's gathered parameters, frozen inputs and packed batches.
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        frozen = freeze_parameters(model, tcfg)
        numel = lambda p: p.ds_numel if hasattr(p, "ds_numel") else p.numel()
        self.num_params = sum(numel(p) for p in model.parameters())
        trainable = sum(numel(p) for p in model.parameters() if p.requires_grad)
        if frozen:
            log.info("froze %d tensors; %.1fM of %.1fM parameters train", len(frozen), trainable / 1e6,
                     self.num_params / 1e6)
        self.setup_mfu(model, model_config, trainable, dtype)
        self.schedule = lambda step: lr_factor(step, tcfg.warmup_steps, self.total_steps, tcfg.lr_schedule,
                                               tcfg.min_lr_ratio)
        self.engine, _, _, _ = deepspeed.initialize(
            model=model, model_parameters=[p for p in model.parameters() if p.requires_grad], config=ds_config,
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, self.schedule))
        self.model = model
        log.info("training %s (%.1fM params) with ZeRO-%d on %d %s rank(s): %d samples/rank, %d steps/epoch, %d steps",
                 self.model_path.name, self.num_params / 1e6, self.zero_stage, self.world, tcfg.device,
                 len(self.dataset), self.data.steps_per_epoch, self.total_steps)

    def setup_mfu(self, model, model_config, trainable: int, dtype) -> None:
        """What MFU needs (mfu.py): the matmul parameters and attention shape, and each rank's peak (on
        CPU every rank times its own cores, at the same time as the others, as in training; ranks of a
        host take the best reading among them)."""
        import torch.distributed as dist

        from sa_sft.train.mfu import MEASURED, device_peak, matmul_params, same_host_peaks

        numel = lambda p: p.ds_numel if hasattr(p, "ds_numel") else p.numel()
        embedding = model.get_input_embeddings().weight
        output = model.get_output_embeddings()
        tied = output is not None and output.weight is embedding
        self.mfu_params, self.mfu_trainable = matmul_params(
            self.num_params, trainable, numel(embedding), tied)
        heads = model_config.num_attention_heads
        self.attn_layers = model_config.num_hidden_layers
        self.attn_dim = heads * (getattr(model_config, "head_dim", None) or model_config.hidden_size // heads)
        peak, source = device_peak(self.tcfg.device, self.tcfg.precision, dtype, self.tcfg.peak_tflops)
        peaks = [None] * self.world
        dist.all_gather_object(peaks, peak)
        if source.startswith(MEASURED):
            peaks = same_host_peaks(peaks, [p["host"] for p in self.placement])
        self.peaks, self.peak_source = peaks, source
        log.info("MFU peak per rank: %s TFLOP/s (%s)", ", ".join(f"{p / 1e12:.2f}" for p in peaks), source)

    def resume(self) -> None:
        """From the latest complete checkpoint: weights, optimizer, scheduler, this rank's RNG; the data
        position is the step itself."""
        import torch.distributed as dist

        ckpts = self.run.checkpoints
        plan = checkpoints.plan_resume(ckpts)
        if self.rank == 0 and plan.discard:
            checkpoints.discard(ckpts, plan.discard)
            for tag in plan.discard:
                log.warning("removed %s: its save was cut short (not named by %s)", ckpts.folder(tag), ckpts.latest_file)
        dist.barrier()
        if plan.tag:
            _, client_state = self.engine.load_checkpoint(str(ckpts.path), tag=plan.tag)
            self.step = client_state["step"]
            rng = torch.load(ckpts.rng_state(plan.tag, self.rank), weights_only=True)
            torch.set_rng_state(rng["torch"])
            if "cuda" in rng and self.tcfg.device == "cuda":
                torch.cuda.set_rng_state(rng["cuda"])
            log.info("resumed from %s at step %d", plan.tag, self.step)
        self.saved_at = self.step if plan.tag else -1
        self.last_save_time, self.save_seconds = time.time(), 0.0
        if self.rank == 0:
            checkpoints.trim_metrics(self.run.metrics, self.step)

    # ---- training
    def train_step(self) -> dict:
        """One optimizer step (grad_accum micro-batches); the loss, tokens and samples summed over ranks."""
        import torch.distributed as dist

        from sa_sft.train.mfu import step_flops

        t0 = time.time()
        batches = self.data.micro_batches(self.step)
        data_wait = time.time() - t0
        device = self.engine.device
        step_tokens = torch.tensor([sum(b.pop("loss_tokens") for b in batches)], dtype=torch.float64, device=device)
        dist.all_reduce(step_tokens)
        # This rank's model FLOPs (mfu.py), gathered so that MFU is reported per rank and overall.
        flops = torch.zeros(self.world, dtype=torch.float64, device=device)
        flops[self.rank] = step_flops(self.mfu_params, self.mfu_trainable, self.attn_layers, self.attn_dim,
                                      [n for b in batches for n in b.pop("sample_lens")])
        divisor = loss_divisor(int(step_tokens.item()), self.world, len(batches))
        stats = torch.zeros(3, dtype=torch.float64, device=device)  # summed token loss, real tokens, samples
        for batch in batches:
            real_tokens, samples = batch.pop("real_tokens"), batch.pop("num_samples")
            loss = self.engine(**{k: v.to(device) for k, v in batch.items()},
                               num_items_in_batch=torch.tensor(divisor, device=device)).loss
            self.engine.backward(loss)
            self.engine.step()
            stats += torch.tensor([loss.item() * divisor, real_tokens.sum().item(), samples], dtype=torch.float64,
                                  device=device)
        dist.all_reduce(stats)
        dist.all_reduce(flops)
        seconds = time.time() - t0
        self.step += 1
        return {"loss_sum": stats[0].item(), "loss_tokens": step_tokens.item(), "tokens": stats[1].item(),
                "samples": stats[2].item(), "seconds": seconds, "data_wait": data_wait, "flops": flops.tolist()}

    def metrics(self, done: dict) -> dict:
        from sa_sft.train.mfu import mfu

        grad_norm = self.engine.get_global_grad_norm()
        return {
            "step": self.step, "epoch": (self.step - 1) // self.data.steps_per_epoch,
            "loss": round(done["loss_sum"] / max(done["loss_tokens"], 1), 6),
            "lr": self.tcfg.learning_rate * self.schedule(self.step - 1),
            "grad_norm": float(grad_norm) if grad_norm is not None else None,
            "tokens_per_s": round(done["tokens"] / done["seconds"], 1),
            "mfu": round(mfu(sum(done["flops"]), done["seconds"], sum(self.peaks)), 4),
            "mfu_per_rank": [round(mfu(f, done["seconds"], p), 4) for f, p in zip(done["flops"], self.peaks)],
            "tflops_per_s": round(sum(done["flops"]) / done["seconds"] / 1e12, 4),
            "samples_per_s": round(done["samples"] / done["seconds"], 2),
            "step_seconds": round(done["seconds"], 3),
            "data_wait_s": round(done["data_wait"], 4),
        }

    def save_checkpoint(self) -> None:
        """Every rank saves its part; only then does rank 0 name it `latest`, the one to resume from."""
        import torch.distributed as dist

        if self.step == self.saved_at:
            return
        self.saved_at = self.step
        ckpts = self.run.checkpoints
        tag = ckpts.tag(self.step)
        ckpts.folder(tag).mkdir(parents=True, exist_ok=True)
        rng = {"torch": torch.get_rng_state()}
        if self.tcfg.device == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state()
        torch.save(rng, ckpts.rng_state(tag, self.rank))
        started = time.time()
        self.engine.save_checkpoint(str(ckpts.path), tag=tag, client_state={"step": self.step}, save_latest=False)
        dist.barrier()
        if self.rank == 0:
            ckpts.set_latest(tag)
            checkpoints.prune(ckpts, self.tcfg.keep_last)
        dist.barrier()
        self.last_save_time, self.save_seconds = time.time(), time.time() - started
        log.info("checkpoint %s saved in %.1f s", tag, self.save_seconds)

    def train(self) -> None:
        from sa_sft.trackers import Trackers
        from sa_sft.train.progress import ProgressFile

        trackers = progress = None
        if self.rank == 0:
            # The bar is drawn by the train stage (progress.py): ranks' own output goes to RUN/logs/.
            progress = ProgressFile(self.run.train_progress, self.total_steps, self.step)
            trackers = Trackers(self.cfg, self.run, "train", resume_step=self.step)  # train.report_to
        self.engine.train()
        while self.step < self.total_steps:
            done = self.train_step()
            if self.rank == 0 and (self.step % self.tcfg.log_every == 0 or self.step == self.total_steps):
                record = self.metrics(done)
                with open(self.run.metrics, "a") as f:
                    f.write(json.dumps(record) + "\n")
                if trackers:
                    trackers.log_metrics(record)
                progress.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}")
            if progress:
                progress.update(1)
            now = time.time()
            time_due = self.rank == 0 and self.policy.time_due(now - self.last_save_time)
            deadline = self.rank == 0 and near_deadline(self.deadline - now if self.deadline else None,
                                                        self.save_seconds, done["seconds"])
            stop, time_due, deadline = agree(self.engine.device, self.stop.signal, time_due, deadline)
            if self.policy.due(self.step, bool(stop or deadline), bool(time_due)):
                self.save_checkpoint()
            if (stop or deadline) and self.step < self.total_steps:
                why = signals.name(stop) if stop else TIME_LIMIT
                if self.rank == 0:
                    atomic_write_json(self.run.interrupted, {"signal": why, "step": self.step})
                    log.warning("%s: stopped at step %d of %d; checkpoint saved, a rerun resumes here",
                                why, self.step, self.total_steps)
                if progress:
                    progress.close()
                if trackers is not None:
                    trackers.close("KILLED")
                sys.exit(EXIT_INTERRUPTED)
        if progress:
            progress.close()
        if trackers is not None:
            trackers.close()
        self.save_checkpoint()  # a no-op unless resumed past the end without one

    # ---- export
    def export_record(self) -> dict:
        return {"steps": self.step, "checkpoint": self.run.checkpoints.latest(), "num_params": self.num_params,
                "zero_stage": self.zero_stage, "ranks": self.world, "placement": self.placement,
                "precision": self.tcfg.precision, "base_model": str(self.model_path),
                "mfu_peak": {"tflops_per_rank": [round(p / 1e12, 3) for p in self.peaks], "source": self.peak_source}}

    def export(self) -> None:
        """Write train/final (rank 0), then check every tensor of it against the engine's parameter.

        An export of this very checkpoint that was already checked is kept as it is (a rerun after a
        crash at exit); one written but not checked is checked. A mismatch keeps the folder as
        train/final.rejected and fails with one line; the rerun exports again from the checkpoint."""
        import torch.distributed as dist

        record = self.run.export_record
        previous = read_json(record) if record.exists() else {}
        same = previous.get("steps") == self.step and previous.get("checkpoint") == self.run.checkpoints.latest()
        status = [(same, previous.get("check", {}).get("mismatched") == [])]
        dist.broadcast_object_list(status, src=0)  # rank 0's reading decides for all (it writes the record)
        same, checked = status[0]
        if same and checked:
            log.info("export of step %d already written and checked: %s", self.step, self.run.final)
            return
        if not same:
            self.write_export()
            dist.barrier()
        check = self.check_export()
        if self.rank == 0:
            if check["mismatched"]:
                shutil.rmtree(self.run.rejected_export, ignore_errors=True)
                self.run.final.rename(self.run.rejected_export)
            else:
                atomic_write_json(record, {**read_json(record), "check": check})
        dist.barrier()
        if check["mismatched"]:
            raise StageFailed(f"train: the exported model does not hold the trained weights "
                              f"({'; '.join(check['mismatched'][:3])}{' ...' if len(check['mismatched']) > 3 else ''}); "
                              f"kept as {self.run.rejected_export}; the final checkpoint is kept, so a rerun "
                              "exports again without retraining")
        log.info("exported %s: %d tensors equal to the trained engine's, bit for bit", self.run.final, check["tensors"])

    def write_export(self) -> None:
        """Stream the weights into train/final: each parameter is gathered in turn (a collective every
        rank takes part in, so none waits long) and rank 0 appends it to the current safetensors shard,
        writing a shard whenever it is full. No process ever holds the whole model."""
        import contextlib

        from sa_sft.io import atomic_dir
        from sa_sft.train.export import ShardWriter, write_model_files

        state_keys = self.persistent_names()
        with contextlib.ExitStack() as stack:
            writer = folder = None
            if self.rank == 0:
                folder = stack.enter_context(atomic_dir(self.run.final))
                writer = ShardWriter(folder)
            for name, tensor in self.gathered(state_keys, share=False):
                writer.add(name, tensor)
            if writer:
                files = writer.close()
                write_model_files(folder, self.model.config, getattr(self.model, "generation_config", None),
                                  self.tokenizer)
                atomic_write_json(folder / self.run.export_record.name, self.export_record())
                log.info("wrote %d safetensors file(s), %.2f GB", len(files), writer.total_bytes / 1e9)

    def persistent_names(self) -> set[str]:
        """The names the export holds: parameters and persistent buffers (no data copied), under the base
        model's names (a LoRA model's adapters are merged into the weights they adapt)."""
        from sa_sft.train.lora import export_name

        names = set(self.model.state_dict())
        return {export_name(n) for n in names if export_name(n)} if self.tcfg.lora_rank else names

    def gathered(self, persistent: set[str], share: bool = True):
        """(name, full tensor) of every parameter and persistent buffer, one at a time, each valid until the
        next is asked for. Every rank takes part in gathering each parameter; a rank receives only its
        share (index modulo world size), or with share=False rank 0 receives all and the others none.
        With LoRA each adapted weight is gathered with its adapters and yielded merged."""
        import deepspeed

        from sa_sft.train.lora import export_name, merged_parameters

        mine = (lambda i: i % self.world == self.rank) if share else (lambda i: self.rank == 0)
        parts = (merged_parameters(self.model) if self.tcfg.lora_rank else
                 ((name, [param], None) for name, param in self.model.named_parameters()))
        for i, (name, params, merge) in enumerate(parts):
            with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
                if mine(i):
                    yield name, (merge(*(p.data for p in params)) if merge else params[0].data)
        if self.rank == 0:
            rename = export_name if self.tcfg.lora_rank else (lambda n: n)
            yield from ((rename(name), buffer) for name, buffer in self.model.named_buffers()
                        if rename(name) in persistent)

    def check_export(self) -> dict:
        """Every rank compares its share of the tensors; rank 0 merges the verdicts and tells every rank."""
        import torch.distributed as dist

        from sa_sft.train.export import compare_tensors, merge_checks

        state_keys = self.persistent_names()
        mine = compare_tensors(self.run.final, self.gathered(state_keys))
        parts = [None] * self.world
        dist.all_gather_object(parts, mine)
        verdict = [merge_checks(parts, state_keys, self.run.final) if self.rank == 0 else None]
        dist.broadcast_object_list(verdict, src=0)
        return verdict[0]
