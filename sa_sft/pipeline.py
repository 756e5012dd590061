"""Runs stages in order on one run directory; finished stages are skipped, interrupted ones resume."""
import contextlib
import logging
import os
from pathlib import Path

from sa_sft.config import Config
from sa_sft.data.task import read_task_data
from sa_sft.errors import UserError
from sa_sft.io import atomic_write_text, file_lock
from sa_sft.models import resolve_model
from sa_sft.report import write_report
from sa_sft.stage import STAGES

log = logging.getLogger("sa_sft")


def stage_runner(name: str):
    # Imported lazily: each stage pulls in heavy libraries (vLLM/Ray, datasets, DeepSpeed).
    if name == "generate":
        from sa_sft.generate.stage import run_generate
        return run_generate
    if name == "mix":
        from sa_sft.data.mix import run_mix
        return run_mix
    if name == "train":
        from sa_sft.train.launch import run_train
        return run_train
    from sa_sft.evaluate.stage import run_evaluate
    return run_evaluate


def preflight(cfg: Config, stages: list[str]) -> None:
    """Cheap checks of everything the pipeline will read, whichever stage runs now, so bad input
    fails in seconds with one line, not after an hour of generation."""
    check_local_ranks(cfg)
    resolve_model(cfg.model.path)
    task_rows = len(read_task_data(cfg.data.task_path, cfg.data.on_bad_row, max_row_bytes=cfg.data.max_row_bytes).rows)
    if "mix" in stages:  # generating fewer self-dialogues than a later mix needs is a choice, not an error
        from sa_sft.data.mix import check_self_supply
        check_self_supply(cfg, task_rows)
    if cfg.data.external_path:
        read_task_data(cfg.data.external_path, cfg.data.on_bad_row, key="data.external_path",
                       max_row_bytes=cfg.data.max_row_bytes)
    from sa_sft.train.ds_config import load_preset
    load_preset(cfg.train.deepspeed_config)
    from sa_sft.evaluate.suites import load_suite, python_checker
    suites = [load_suite(spec, cfg.evaluate.max_items) for spec in cfg.evaluate.suites]
    checkers = {row["checker"] for s in suites for row in s.rows if str(row.get("checker", "")).startswith("python:")}
    if cfg.evaluate.task_checker.startswith("python:"):
        checkers.add(cfg.evaluate.task_checker)
    for checker in checkers:
        python_checker(checker)
    if "evaluate" in stages and any(s.kind == "code" for s in suites):
        from sa_sft.evaluate.sandbox import check_isolation
        check_isolation()


def check_local_ranks(cfg: Config) -> None:
    """torchrun and deepspeed start every rank on this node: one device (or core) each at least."""
    if cfg.train.launcher not in ("torchrun", "deepspeed"):
        return
    if cfg.train.device == "cuda":
        import torch
        have, what = torch.cuda.device_count(), "GPU(s)"
    else:
        have, what = os.cpu_count() or 1, "CPU cores"
    if cfg.train.ranks > have:
        raise UserError(f"config key train.ranks ({cfg.train.ranks}) is more than the {have} {what} of this node; "
                        "lower it, or spread ranks over nodes with train.launcher=srun or ray")


@contextlib.contextmanager
def log_to_file(path: Path):
    """Also write every log line to `path` for the duration (once, however deeply nested)."""
    root = logging.getLogger()
    if any(isinstance(h, logging.FileHandler) and Path(h.baseFilename) == path.resolve() for h in root.handlers):
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    root.addHandler(handler)
    try:
        yield
    finally:
        root.removeHandler(handler)
        handler.close()


def run_stages(cfg: Config, stages: list[str], overwrite: bool = False) -> dict:
    run_dir = Path(cfg.output_dir)
    preflight(cfg, stages)
    run_dir.mkdir(parents=True, exist_ok=True)
    with file_lock(run_dir / ".lock", f"run directory {run_dir}", wait=False):
        atomic_write_text(run_dir / "config.yaml", cfg.to_yaml())
        with log_to_file(run_dir / "sa_sft.log"):
            for name in STAGES:
                if name in stages:
                    log.info("== %s ==", name)
                    stage_runner(name)(cfg, run_dir, overwrite)
            report = write_report(run_dir)
    log.info("report: %s", run_dir / "report.md")
    return report
