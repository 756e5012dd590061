"""Training throughput: the sa-sft DeepSpeed ZeRO-3 trainer against plain PyTorch DDP on the
same model, batches and precision (2 ranks), plus packing efficiency and data-wait share.

    .venv/bin/python benchmarks/training.py [--model default] [--steps 4] [--samples 96]

The first step of each run (warm-up, allocations) is left out of the step time. Prints a
table and writes benchmarks/results/training.json.
"""
import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sa_sft.io import atomic_write_json, read_jsonl  # noqa: E402
from sa_sft.rundir import RunDir  # noqa: E402

RESULTS = REPO / "benchmarks" / "results" / "training.json"


def cli(*args) -> None:
    proc = subprocess.run([sys.executable, "-m", "sa_sft.cli", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"sa-sft {' '.join(args)} failed:\n{proc.stderr[-3000:]}")


def padding_efficiency(lengths: list[int], batch: int, seed: int = 0) -> float:
    """Real tokens / padded slots for random micro-batches padded to their longest row."""
    order = list(lengths)
    random.Random(seed).shuffle(order)
    slots = sum(max(order[i:i + batch]) * len(order[i:i + batch]) for i in range(0, len(order), batch))
    return sum(order) / slots


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--samples", type=int, default=96, help="task rows to train on")
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--max-seq-len", type=int, default=512)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="sa_sft_bench_"))
    base = ["demo", f"model.path={args.model}", "generate.num_samples=0", "data.heldout_self=0", "data.heldout_task=0",
            "mix.self_ratio=0", f"data.max_task_samples={args.samples}", f"train.micro_batch_size={args.micro_batch}",
            "train.gradient_accumulation_steps=1", f"train.max_seq_len={args.max_seq_len}",
            f"train.max_steps={args.steps}", "train.tensorboard=false"]
    try:
        prepared = work / "prepared"
        cli("generate", *base, f"output_dir={prepared}")
        cli("mix", *base, f"output_dir={prepared}")
        lengths = [len(r) for rank in (0, 1) for r in
                   __import__("datasets").load_from_disk(str(RunDir(prepared).rank_data(rank)))["input_ids"]]

        zero3 = work / "zero3"
        shutil.copytree(prepared, zero3)
        cli("train", *base, f"output_dir={zero3}")
        metrics = read_jsonl(RunDir(zero3).metrics)[1:]
        zero3_step = statistics.mean(m["step_seconds"] for m in metrics)

        config = RunDir(zero3).train_config
        env = dict(os.environ, OMP_NUM_THREADS="1")
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                               "--master_port", "29731", str(REPO / "benchmarks" / "ddp_baseline.py"),
                               "--run-dir", str(zero3), "--config", str(config), "--steps", str(args.steps)],
                              capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            sys.exit(f"DDP baseline failed:\n{proc.stderr[-3000:]}")
        ddp = json.loads(proc.stdout.strip().splitlines()[-1])
        ddp_step = statistics.mean(ddp["step_seconds"][1:])

        packed_dir = work / "packed"
        shutil.copytree(prepared, packed_dir, ignore=shutil.ignore_patterns("mix"))
        cli("mix", *base, "train.packing=true", f"output_dir={packed_dir}")
        packing = RunDir(packed_dir).manifest("mix")["packing_efficiency"]
        train_manifest = RunDir(zero3).manifest("train")
        precision = yaml.safe_load(config.read_text())["train"]["precision"]
    finally:
        shutil.rmtree(work, ignore_errors=True)

    report = {
        "machine": {"cpus": os.cpu_count(), "ranks": 2, "precision": precision},
        "workload": {"model": args.model, "samples": args.samples, "micro_batch_size": args.micro_batch,
                     "max_seq_len": args.max_seq_len, "steps": args.steps, "params": train_manifest["num_params"]},
        "zero3_step_seconds": round(zero3_step, 3),
        "ddp_step_seconds": round(ddp_step, 3),
        "zero3_over_ddp_step_time": round(zero3_step / ddp_step, 3),
        "tokens_per_s": round(statistics.mean(m["tokens_per_s"] for m in metrics), 1),
        "mfu": round(statistics.mean(m["mfu"] for m in metrics), 4),
        "data_wait_fraction": round(sum(m["data_wait_s"] for m in metrics) / sum(m["step_seconds"] for m in metrics), 5),
        "padding_efficiency": round(padding_efficiency(lengths, args.micro_batch), 4),
        "packing_efficiency": packing,
    }
    atomic_write_json(RESULTS, report)
    print(f"{'metric':<28} {'value':>10}")
    for key in ("zero3_step_seconds", "ddp_step_seconds", "zero3_over_ddp_step_time", "tokens_per_s", "mfu",
                "data_wait_fraction", "padding_efficiency", "packing_efficiency"):
        print(f"{key:<28} {report[key]:>10}")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
