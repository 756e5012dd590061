"""Training: the sa-sft ZeRO-3 trainer's step against plain PyTorch DDP on the same model, batches and
precision (2 ranks), the ZeRO-3 preset as shipped and as it was before issue 14; MFU per rank; the
packer on the demo's mix.

    .venv/bin/python benchmarks/training.py [--model default] [--steps 5] [--samples 96] [--demo-run runs/demo]

The three configurations run alternately inside the same two ranks (benchmarks/ddp_baseline.py), so
they share whatever else loads the machine at each moment; the first step (warm-up, allocations) is
left out. Prints a table and writes benchmarks/results/training.json.
"""
import argparse
import json
import math
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sa_sft.data.packing import first_fit_decreasing, pack, packing_efficiency  # noqa: E402
from sa_sft.hardware import cpu_flags, versions as package_versions  # noqa: E402
from sa_sft.io import atomic_write_json  # noqa: E402
from sa_sft.rundir import RunDir  # noqa: E402
from sa_sft.train.mfu import DATASHEET_TFLOPS  # noqa: E402

RESULTS = REPO / "benchmarks" / "results" / "training.json"
FLAGS = ("avx2", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")


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


def mix_lengths(run_dir: Path) -> list[int]:
    """Sample lengths of a run's mix in the mix's shuffled order (the ranks took it round-robin)."""
    from datasets import load_from_disk

    run = RunDir(run_dir)
    ranks = [load_from_disk(str(run.rank_data(r)))["seq_lens"] for r in range(run.manifest("mix")["ranks"])]
    return [n for row in zip(*ranks) for lens in row for n in lens]


def packing_report(lengths: list[int], max_lens=(512, 1024)) -> dict:
    """The packer (sa_sft.data.packing.pack) against first-fit decreasing, its predecessor, and the
    bound no packer beats (total tokens / sequence length, rounded up)."""
    rows = [{"id": str(i), "source": "task", "input_ids": [0] * n, "labels": [0] * n} for i, n in enumerate(lengths)]
    out = {"samples": len(lengths), "tokens": sum(lengths), "by_max_len": {}}
    for max_len in max_lens:
        packs = pack(rows, max_len)
        ffd = sum(len(first_fit_decreasing(lengths[i:i + 512], max_len)) for i in range(0, len(lengths), 512))
        out["by_max_len"][str(max_len)] = {
            "sa_sft": round(packing_efficiency(packs, max_len), 4), "sequences": len(packs),
            "first_fit_decreasing": round(sum(lengths) / (ffd * max_len), 4), "first_fit_sequences": ffd,
            "lower_bound_sequences": math.ceil(sum(lengths) / max_len)}
    return out


def machine(precision: str, load_at_start: tuple) -> dict:
    versions = package_versions()
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), "unknown")
    return {"cpu": model, "cpus": os.cpu_count(), "cpu_flags": sorted(f for f in FLAGS if f in cpu_flags()),
            "ranks": 2, "threads_per_rank": 1, "precision": precision,
            "versions": {k: versions.get(k) for k in ("torch", "deepspeed", "transformers")},
            # Before the benchmark started anything: what else was running on these cores.
            "load_average_at_start": [round(x, 2) for x in load_at_start],
            "shared": load_at_start[0] > 0.5}


def mean_after_warmup(values: list[float]) -> float:
    return statistics.mean(values[1:]) if len(values) > 1 else values[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--steps", type=int, default=5, help="steps of each configuration, alternated (the first is warm-up)")
    parser.add_argument("--samples", type=int, default=96, help="task rows to train on")
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--max-seq-len", type=int, default=512)
    parser.add_argument("--demo-run", type=Path, default=REPO / "runs" / "demo",
                        help="a finished `sa-sft run demo`, whose mix the packer is measured on")
    args = parser.parse_args()

    started, load_at_start = time.time(), os.getloadavg()
    work = Path(tempfile.mkdtemp(prefix="sa_sft_bench_"))
    base = ["demo", f"model.path={args.model}", "generate.num_samples=0", "data.heldout_self=0", "data.heldout_task=0",
            "mix.self_ratio=0", f"data.max_task_samples={args.samples}", f"train.micro_batch_size={args.micro_batch}",
            "train.gradient_accumulation_steps=1", f"train.max_seq_len={args.max_seq_len}",
            f"train.max_steps={args.steps}", "train.report_to=[]"]
    try:
        prepared = work / "prepared"
        cli("generate", *base, f"output_dir={prepared}")
        cli("mix", *base, f"output_dir={prepared}")
        lengths = mix_lengths(prepared)

        # The train stage writes this config for its ranks; the comparison reads the same file.
        from sa_sft.config import load_config
        cfg = load_config(base[0], base[1:] + [f"output_dir={prepared}"])
        config = work / "train_config.yaml"
        config.write_text(cfg.to_yaml())
        env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", TOKENIZERS_PARALLELISM="false",
                   PYTHONWARNINGS="ignore")
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                               "--master_port", "29731", str(REPO / "benchmarks" / "ddp_baseline.py"),
                               "--run-dir", str(prepared), "--config", str(config), "--steps", str(args.steps),
                               "--work", str(work)], capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            sys.exit(f"the DDP / ZeRO-3 comparison failed:\n{proc.stderr[-3000:]}")
        compare = json.loads(proc.stdout.strip().splitlines()[-1])

        packed_dir = work / "packed"
        shutil.copytree(prepared, packed_dir, ignore=shutil.ignore_patterns("mix"))
        cli("mix", *base, "train.packing=true", f"output_dir={packed_dir}")
        mix_stage_packing = RunDir(packed_dir).manifest("mix")["packing_efficiency"]
        precision = yaml.safe_load(config.read_text())["train"]["precision"]
    finally:
        shutil.rmtree(work, ignore_errors=True)

    seconds = compare["step_seconds"]
    paired = {name: [z / d for z, d in zip(seconds[name][1:], seconds["ddp"][1:])] for name in ("zero3", "untuned")}
    metrics = compare["metrics"]["zero3"][1:]
    per_rank = [round(statistics.mean(r), 4) for r in zip(*(m["mfu_per_rank"] for m in metrics))]
    losses = {name: [m["loss"] for m in compare["metrics"][name]] for name in ("zero3", "untuned")}
    demo = args.demo_run if (args.demo_run / "mix").is_dir() else None
    report = {
        "machine": {**machine(precision, load_at_start), "load_average_at_end": [round(x, 2) for x in os.getloadavg()]},
        "workload": {"model": args.model, "samples": args.samples, "micro_batch_size": args.micro_batch,
                     "max_seq_len": args.max_seq_len, "steps": args.steps, "measured_steps": args.steps - 1,
                     "how": "DDP, tuned and untuned ZeRO-3 alternated step by step in the same 2 ranks"},
        "zero3_step_seconds": round(mean_after_warmup(seconds["zero3"]), 3),
        "untuned_zero3_step_seconds": round(mean_after_warmup(seconds["untuned"]), 3),
        "ddp_step_seconds": round(mean_after_warmup(seconds["ddp"]), 3),
        # The median over steps of (ZeRO-3 step / DDP step on the same batches, moments apart).
        "zero3_over_ddp_step_time": round(statistics.median(paired["zero3"]), 3),
        "untuned_zero3_over_ddp_step_time": round(statistics.median(paired["untuned"]), 3),
        "paired_ratios": {name: [round(r, 3) for r in v] for name, v in paired.items()},
        "step_seconds": {name: [round(s, 2) for s in v] for name, v in seconds.items()},
        "tuned_zero_optimization": compare["tuned_zero_optimization"],
        "untuned_zero_optimization": compare["untuned_zero_optimization"],
        "gloo_collectives_50M_bf16_s": compare["collectives_50M_bf16_s"],
        "max_loss_difference_tuned_vs_untuned": round(max(abs(a - b) for a, b in zip(*losses.values())), 6),
        "losses": losses,
        "tokens_per_s": round(statistics.mean(m["tokens_per_s"] for m in metrics), 1),
        "mfu": {"overall": round(statistics.mean(m["mfu"] for m in metrics), 4), "per_rank": per_rank,
                "tflops_per_s": round(statistics.mean(m["tflops_per_s"] for m in metrics), 4),
                "peak_tflops_per_rank": compare["mfu_peak"]["tflops_per_rank"],
                "peak_source": compare["mfu_peak"]["source"],
                "flops": "PaLM appendix B: 6N per token (2N forward + 4N backward) + 12·L·H·Q·T attention, "
                         "T each sample's own length; ZeRO-3 tuned steps",
                "datasheet_tflops": {name: peaks for _, name, peaks in DATASHEET_TFLOPS}},
        "data_wait_fraction": round(sum(m["data_wait_s"] for m in metrics) / sum(m["step_seconds"] for m in metrics), 5),
        "padding_efficiency": round(padding_efficiency(lengths, args.micro_batch), 4),
        "packing": {"demo_mix": packing_report(mix_lengths(demo)) if demo else None,
                    "demo_run": str(demo) if demo else f"{args.demo_run} not found: run `make demo` first",
                    "task_rows": packing_report(lengths),
                    "mix_stage_task_rows": {str(args.max_seq_len): mix_stage_packing}},
        "seconds": round(time.time() - started, 1),
    }
    atomic_write_json(RESULTS, report)

    rows = [("ZeRO-3 step (s), tuned preset", report["zero3_step_seconds"]),
            ("ZeRO-3 step (s), untuned preset", report["untuned_zero3_step_seconds"]),
            ("DDP step (s)", report["ddp_step_seconds"]),
            ("ZeRO-3 / DDP, tuned (median paired)", report["zero3_over_ddp_step_time"]),
            ("ZeRO-3 / DDP, untuned (median paired)", report["untuned_zero3_over_ddp_step_time"]),
            ("max |loss tuned - untuned|", report["max_loss_difference_tuned_vs_untuned"]),
            ("tokens/s (ZeRO-3 tuned)", report["tokens_per_s"]),
            ("MFU overall", report["mfu"]["overall"]),
            ("MFU per rank", ", ".join(map(str, per_rank))),
            ("peak per rank (TFLOP/s)", ", ".join(map(str, report["mfu"]["peak_tflops_per_rank"]))),
            ("data wait / step", report["data_wait_fraction"]),
            ("padding efficiency", report["padding_efficiency"])]
    for name, packing in (("demo mix", report["packing"]["demo_mix"]), ("task rows", report["packing"]["task_rows"])):
        for max_len, p in (packing or {}).get("by_max_len", {}).items():
            rows.append((f"packing, {name}, {max_len} tokens", f"{p['sa_sft']} ({p['sequences']} seq; first fit "
                         f"{p['first_fit_decreasing']}, {p['first_fit_sequences']}; bound {p['lower_bound_sequences']})"))
    print(f"machine: {report['machine']['cpu']}, {report['machine']['cpus']} cores, "
          f"{','.join(report['machine']['cpu_flags'])}, {precision}; peak: {report['mfu']['peak_source']}")
    if report["machine"]["shared"]:
        print(f"other processes shared these cores: load average {load_at_start[0]:.1f} before the benchmark started")
    for name, value in rows:
        print(f"{name:<40} {value}")
    print(f"{report['seconds']} s; wrote {RESULTS}")


if __name__ == "__main__":
    main()
