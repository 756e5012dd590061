"""Plain PyTorch DDP against the sa-sft trainer's ZeRO-3 step (the preset as shipped, and as it was
before issue 14), alternated step by step inside the same ranks on the same batches.

Launched by benchmarks/training.py under torchrun; prints one JSON line (rank 0). Alternating inside
one pair of processes, with the order rotated every step, puts all three under the same load at the
same moment: these machines are shared, and runs one after another differ by more than the effect.

    DDP        AutoModelForCausalLM + torch.nn.parallel.DistributedDataParallel + torch.optim.AdamW
               over gloo, the step's micro-batches from the trainer's own RankData
    zero3      SFTRecipe.train_step() of sa_sft/train/recipe.py: the trainer's step, the preset
               sa_sft/ds_configs/zero3.json with its "auto" fields resolved as in training
    untuned    the same with the zero_optimization fields the preset resolved to before issue 14
"""
import argparse
import copy
import json
import time
from pathlib import Path

import torch
import torch.distributed as dist

# What zero3.json's "auto" fields resolved to on CPU before issue 14 (Hugging Face's sizes at any
# hidden size, reduce-scatter); the rest of the preset as shipped. h is the model's hidden size.
UNTUNED = {"reduce_bucket_size": "h*h", "stage3_prefetch_bucket_size": "0.9*h*h",
           "stage3_param_persistence_threshold": "10*h", "reduce_scatter": True}


def untuned_preset(tuned: dict, hidden: int) -> dict:
    config = copy.deepcopy(tuned)
    sizes = {"h*h": hidden * hidden, "0.9*h*h": int(0.9 * hidden * hidden), "10*h": 10 * hidden}
    config["zero_optimization"].update({k: sizes.get(v, v) for k, v in UNTUNED.items()})
    return config


def time_collectives(numel: int, repeats: int) -> dict:
    """Seconds of gloo's all-reduce and reduce-scatter on one bf16 bucket, alternated: why ZeRO on CPU
    all-reduces its gradients."""
    x = torch.ones(numel, dtype=torch.bfloat16)
    out = torch.empty(numel // dist.get_world_size(), dtype=torch.bfloat16)
    times = {"all_reduce": [], "reduce_scatter": []}
    for _ in range(repeats):
        for name in times:
            dist.barrier()
            start = time.perf_counter()
            dist.all_reduce(x) if name == "all_reduce" else dist.reduce_scatter_tensor(out, x)
            dist.barrier()
            times[name].append(time.perf_counter() - start)
    return {name: round(min(t), 3) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--run-dir", type=Path, required=True)
    parser.add_argument("--config", required=True)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--work", type=Path, required=True, help="where the untuned preset is written")
    args = parser.parse_args()
    from sa_sft.cache import use_own_ninja
    use_own_ninja()  # the trainer's ninja, so DeepSpeed's ops built by the trainer are reused

    from transformers import AutoConfig, AutoModelForCausalLM

    from sa_sft.config import load_config
    from sa_sft.data.packing import BOOKKEEPING
    from sa_sft.hardware import torch_dtype
    from sa_sft.rundir import RunDir
    from sa_sft.train.ds_config import build_ds_config
    from sa_sft.train.recipe import SFTRecipe

    cfg = load_config(args.config)
    run = RunDir(args.run_dir)
    tcfg = cfg.train
    zero3 = SFTRecipe(cfg, run)
    zero3.setup_distributed()
    zero3.setup_data()
    rank, world = zero3.rank, zero3.world
    collectives = time_collectives(50_000_000, repeats=3)

    # DDP's model first: from_pretrained must not see a live HfDeepSpeedConfig (it would partition it).
    model = AutoModelForCausalLM.from_pretrained(zero3.model_path, dtype=torch_dtype(tcfg.precision),
                                                 attn_implementation=tcfg.attn_implementation)
    model.config.use_cache = False
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.AdamW(ddp.parameters(), lr=tcfg.learning_rate, betas=(tcfg.adam_beta1, tcfg.adam_beta2),
                                  weight_decay=tcfg.weight_decay)
    zero3.setup_model()

    hidden = AutoConfig.from_pretrained(zero3.model_path).hidden_size
    untuned_path = args.work / "zero3_untuned.json"
    if rank == 0:
        untuned_path.write_text(json.dumps(untuned_preset(build_ds_config(tcfg, hidden), hidden), indent=1))
    dist.barrier()
    untuned_cfg = copy.deepcopy(cfg)
    untuned_cfg.train.deepspeed_config = str(untuned_path)
    untuned = SFTRecipe(untuned_cfg, run)
    untuned.setup_distributed()
    untuned.setup_data()
    untuned.setup_model()

    def ddp_step(step: int) -> None:
        batches = zero3.data.micro_batches(step)
        for i, batch in enumerate(batches):
            for key in BOOKKEEPING:
                batch.pop(key)
            ctx = ddp.no_sync() if i < len(batches) - 1 else torch.enable_grad()
            with ctx:
                (ddp(**batch).loss / len(batches)).backward()
        torch.nn.utils.clip_grad_norm_(ddp.parameters(), tcfg.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    runs = {"ddp": ddp_step, "zero3": lambda step: zero3.train_step(), "untuned": lambda step: untuned.train_step()}
    seconds = {name: [] for name in runs}
    records = {"zero3": [], "untuned": []}
    names = list(runs)
    for step in range(args.steps):
        for name in names[step % 3:] + names[:step % 3]:  # each goes first, second and last in turn
            dist.barrier()
            start = time.perf_counter()
            done = runs[name](step)
            dist.barrier()
            seconds[name].append(time.perf_counter() - start)
            if name != "ddp":
                recipe = zero3 if name == "zero3" else untuned
                records[name].append(recipe.metrics(done))
    if rank == 0:
        print(json.dumps({"step_seconds": seconds, "metrics": records, "collectives_50M_bf16_s": collectives,
                          "untuned_zero_optimization": json.loads(untuned_path.read_text())["zero_optimization"],
                          "tuned_zero_optimization": build_ds_config(tcfg, hidden)["zero_optimization"],
                          "mfu_peak": {"tflops_per_rank": [round(p / 1e12, 3) for p in zero3.peaks],
                                       "source": zero3.peak_source}}), flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
