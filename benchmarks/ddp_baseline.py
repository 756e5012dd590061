"""Plain PyTorch DDP on the same model, data, batches and precision as the sa-sft trainer.

Launched by benchmarks/training.py under torchrun; prints one JSON line with step times.
"""
import argparse
import json
import time
from pathlib import Path

import torch
import torch.distributed as dist


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--run-dir", type=Path, required=True)
    parser.add_argument("--config", required=True)
    parser.add_argument("--steps", type=int, required=True)
    args = parser.parse_args()

    from datasets import load_from_disk
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sa_sft.chat import pad_token_id
    from sa_sft.config import load_config
    from sa_sft.data.packing import BOOKKEEPING
    from sa_sft.hardware import torch_dtype
    from sa_sft.models import resolve_model
    from sa_sft.rundir import RunDir
    from sa_sft.train.data import RankData

    cfg = load_config(args.config)
    tcfg = cfg.train
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.set_num_threads(tcfg.threads_per_rank)
    run = RunDir(args.run_dir)
    mix = run.manifest("mix")
    dataset = load_from_disk(str(run.rank_data(rank)))
    path = resolve_model(cfg.model.path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    data = RankData(dataset, tcfg.micro_batch_size, tcfg.gradient_accumulation_steps, cfg.seed, rank,
                    pad_token_id(tokenizer), packed=mix.get("packed", False))
    dtype = torch_dtype(tcfg.precision)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=tcfg.attn_implementation)
    model.config.use_cache = False
    model = torch.nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=tcfg.learning_rate,
                                  betas=(tcfg.adam_beta1, tcfg.adam_beta2), weight_decay=tcfg.weight_decay)
    times, tokens = [], []
    for step in range(args.steps):
        t0 = time.time()
        batches = data.micro_batches(step)
        real = 0
        for i, batch in enumerate(batches):
            real += int(batch["real_tokens"].sum())
            for key in BOOKKEEPING:
                batch.pop(key)
            ctx = model.no_sync() if i < len(batches) - 1 else torch.enable_grad()
            with ctx:
                loss = model(**batch).loss / len(batches)
                loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), tcfg.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        total = torch.tensor([real], dtype=torch.float64)
        dist.all_reduce(total)
        times.append(time.time() - t0)
        tokens.append(total.item())
    if rank == 0:
        print(json.dumps({"step_seconds": times, "tokens": tokens}), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
