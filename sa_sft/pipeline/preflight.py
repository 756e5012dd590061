"""Preflight: cheap checks of everything the pipeline will read, whichever stage runs now, so bad input
fails in seconds with one line, not after an hour of generation."""
import os

from sa_sft.config import Config
from sa_sft.data.plan import check_self_supply
from sa_sft.data.task import open_data
from sa_sft.errors import UserError
from sa_sft.models import resolve_model


def preflight(cfg: Config, stages: list[str]) -> None:
    check_local_ranks(cfg)
    model_path = resolve_model(cfg.model.path)
    if cfg.train.device == "cuda" or cfg.generate.device == "cuda":
        from sa_sft.pipeline.planner import plan_for, refusal
        problem = refusal(plan_for(cfg))
        if problem:
            raise problem
    task_rows = sum(1 for _ in open_data(cfg.data))  # streamed: a large data set is never all in memory
    if "mix" in stages:  # generating fewer self-dialogues than a later mix needs is a choice, not an error
        check_self_supply(cfg, task_rows)
    if cfg.data.external_path:
        for _ in open_data(cfg.data, "data.external_path"):
            pass
    from sa_sft.train.ds_config import load_preset
    from sa_sft.train.freezing import check_freeze_settings
    load_preset(cfg.train.deepspeed_config)
    check_freeze_settings(cfg.train, model_path)
    check_attention(cfg)
    if "train" in stages or "evaluate" in stages:
        from sa_sft.trackers import check_trackers
        check_trackers(cfg)
    from sa_sft.evaluate.harness import check_tasks, is_harness
    from sa_sft.evaluate.suites import load_suite, python_checker
    suites = [load_suite(spec, cfg.evaluate.max_items) for spec in cfg.evaluate.suites if not is_harness(spec)]
    check_tasks(cfg)
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


def check_attention(cfg: Config) -> None:
    """FlashAttention-2 runs on GPUs only, from the `flash-attn` package (the `flash` extra)."""
    import importlib.util

    if cfg.train.attn_implementation != "flash_attention_2":
        return
    if cfg.train.device != "cuda":
        raise UserError("config key train.attn_implementation=flash_attention_2 needs train.device=cuda; "
                        "use sdpa on CPU")
    if importlib.util.find_spec("flash_attn") is None:
        raise UserError("config key train.attn_implementation=flash_attention_2 needs the flash-attn package: "
                        "pip install --no-build-isolation 'sa-sft[flash]' (or use sdpa)")
