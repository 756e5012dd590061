"""The prepared check for the first session with a GPU: at most 8 minutes on one H200.

    make gpu-check            (python benchmarks/gpu_check.py; --device cpu runs the same steps small)

1. generation: the engine pool against transformers `generate`, same prompts and sampling, same run;
2. the pipeline on the GPU: generate, mix, a few ZeRO-3 steps (tokens/s, MFU), the streamed export
   and its tensor-by-tensor check, evaluation through the engines (which reload the export in vLLM);
3. `sa-sft plan` for the same layout, to set its numbers beside the measured ones.
Writes benchmarks/results/gpu.json (benchmarks/results/gpu_check_cpu.json with --device cpu).
"""
import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
os.environ.setdefault("SA_SFT_CACHE_DIR", str(REPO / ".cache"))

from sa_sft.config import load_config  # noqa: E402
from sa_sft.io import atomic_write_json, read_jsonl  # noqa: E402
from sa_sft.models import resolve_model  # noqa: E402
from sa_sft.rundir import RunDir  # noqa: E402


def machine() -> dict:
    info = {"python": platform.python_version(), "cpus": os.cpu_count()}
    if shutil.which("nvidia-smi"):
        info["gpus"] = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
                                       "--format=csv,noheader"], capture_output=True, text=True).stdout.strip()
    import torch
    info["torch"] = torch.__version__
    info["cuda"] = torch.version.cuda
    return info


def cli(*args: str, timeout: float) -> tuple[float, subprocess.CompletedProcess]:
    started = time.time()
    proc = subprocess.run([sys.executable, "-m", "sa_sft.cli", *args], capture_output=True, text=True, timeout=timeout)
    return time.time() - started, proc


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    args = parser.parse_args()
    gpu = args.device == "cuda"
    results = REPO / "benchmarks" / "results" / ("gpu.json" if gpu else "gpu_check_cpu.json")
    model, config = ("default", "demo") if gpu else ("tiny", "tiny")  # a random tiny model fails demo's filters
    report = {"machine": machine(), "device": args.device, "model": model, "ok": False}
    overrides = [f"model.path={model}", f"generate.device={args.device}", f"train.device={args.device}",
                 "train.ranks=1", "generate.engines=1"]

    # 1. Generation against transformers, one engine, the same prompts and sampling.
    from generation import hf_run, pool_run

    dialogues, shard = (256, 64) if gpu else (16, 8)
    cfg = load_config("demo", overrides + ["generate.max_user_tokens=128", "generate.max_assistant_tokens=256"])
    sampling = {k: getattr(cfg.generate, k) for k in ("strategy", "temperature", "top_p", "top_k", "turns",
                                                      "max_user_tokens", "max_assistant_tokens")}
    path = resolve_model(model)
    pool = pool_run(cfg, path, dialogues // shard, shard, sampling)
    hf = hf_run(path, cfg, dialogues // shard, shard, sampling, batch_size=dialogues if gpu else 8, device=args.device)
    report["generation"] = {"dialogues": dialogues, "pool": pool, "transformers": hf,
                            "ratio_vs_hf": round(pool["tokens_per_s"] / hf["tokens_per_s"], 2)}
    print(f"generation: pool {pool['tokens_per_s']} tok/s, transformers {hf['tokens_per_s']} tok/s", flush=True)

    # 2. The pipeline on the device: a few ZeRO-3 steps, the export and its check, evaluation on the engines.
    work = Path(tempfile.mkdtemp(prefix="sa_sft_gpu_check_"))
    try:
        run = RunDir(work / "run")
        steps = 20 if gpu else 2
        seconds, proc = cli("run", config, *overrides, f"output_dir={run.root}", f"train.max_steps={steps}",
                            "train.checkpoint_every=10", "evaluate.max_items=100", timeout=420 if gpu else 1800)
        report["pipeline"] = {"seconds": round(seconds, 1), "exit": proc.returncode,
                              "last_line": (proc.stderr.strip().splitlines() or [""])[-1]}
        if proc.returncode == 0:
            train = run.manifest("train")
            metrics = read_jsonl(run.metrics)[1:] or read_jsonl(run.metrics)
            report["pipeline"].update(
                stages={s: run.manifest(s)["seconds"] for s in ("generate", "mix", "train", "evaluate")},
                train_tokens_per_s=round(sum(m["tokens_per_s"] for m in metrics) / len(metrics), 1),
                mfu=round(sum(m["mfu"] for m in metrics) / len(metrics), 4), export_check=train["export_check"],
                eval=json.loads(run.report_json.read_text()).get("eval"))
        _, plan = cli("plan", config, *overrides, timeout=120)
        report["plan"] = plan.stdout
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report["ok"] = report["pipeline"]["exit"] == 0
    atomic_write_json(results, report)
    print(json.dumps({k: report[k] for k in ("generation", "pipeline")}, indent=1, default=str)[:3000])
    print(f"wrote {results}")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
