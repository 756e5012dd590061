"""The train stage: launch one trainer process per rank (launchers.py), then check what they left
in the run directory: a checked export, an interrupted run's checkpoint, or a failed rank."""
import logging
from pathlib import Path

from sa_sft.config import Config, section_for_results
from sa_sft.errors import Interrupted, StageFailed, UserError
from sa_sft.io import atomic_write_text, read_json, read_jsonl
from sa_sft.models import model_identity, resolve_model
from sa_sft.rundir import RunDir, Stage
from sa_sft.train.launchers import run_ranks
from sa_sft.train.recipe import check_rank_rows

log = logging.getLogger("sa_sft.train")


def interpolation_source(cfg: Config) -> Path:
    """train.interpolate_from as a model folder: a run directory means its fine-tuned model."""
    path = Path(cfg.train.interpolate_from)
    return RunDir(path).final if RunDir(path).stage_dir("train").is_dir() else path


def inputs(cfg: Config, run: RunDir) -> dict:
    found = {"mix": run.fingerprint("mix"), "model": cfg.model.path, "seed": cfg.seed,
             "train": section_for_results(cfg.train)}
    if cfg.train.interpolate_from:
        source = interpolation_source(cfg)
        found["interpolate_from"] = model_identity(source) if source.is_dir() else str(source)
    return found


def run_interpolation(cfg: Config, run: RunDir) -> dict:
    """WiSE-FT: the base and a fine-tuned model mixed, written as this run's fine-tuned model."""
    from sa_sft.train.interpolate import interpolate

    source = interpolation_source(cfg)
    if not source.is_dir():
        raise UserError(f"config key train.interpolate_from: {source} does not exist; train that run first")
    log.info("train: WiSE-FT, %.2f x %s + %.2f x the base model, no training", cfg.train.interpolate_alpha,
             source, 1 - cfg.train.interpolate_alpha)
    result = interpolate(resolve_model(cfg.model.path), source, cfg.train.interpolate_alpha, run.final)
    return dict(steps=0, interpolated=result)


def rank_failure(returncode: int, signals: list[str], run: RunDir) -> UserError:
    """What a failed launch means, as one line."""
    if run.interrupted.exists():
        stop = read_json(run.interrupted)
        return Interrupted(f"train: stopped by {stop['signal']} at step {stop['step']} with a checkpoint; "
                           f"rerun the same command to resume", signals[0] if signals else stop["signal"])
    if signals:
        return Interrupted(f"train: stopped by {signals[0]} before a new checkpoint; rerun the same command to "
                           f"resume from the last one", signals[0])
    if run.rank_error.exists():
        error = read_json(run.rank_error)
        kind = StageFailed if error["exit_code"] == StageFailed.exit_code else UserError
        return kind(error["message"])
    resume = run.checkpoints.latest() or "the start (no checkpoint yet)"
    return StageFailed(f"train: a training rank failed (launcher exit {returncode}; the launcher's summary "
                       f"names the rank); see {run.output_log('train')} and {run.output_log('train', 'rank-*')}; "
                       f"rerun to resume from {resume}")


def run_stage(cfg: Config, run: RunDir, stage: Stage) -> dict:
    if cfg.train.interpolate_from:
        return run_interpolation(cfg, run)
    check_rank_rows(run.manifest("mix")["rows_per_rank"], cfg.train)
    atomic_write_text(run.train_config, cfg.to_yaml())
    run.interrupted.unlink(missing_ok=True)
    run.rank_error.unlink(missing_ok=True)
    returncode, signals = run_ranks(cfg, run)
    export = read_json(run.export_record) if run.export_record.exists() else {}
    checked = export.get("check", {}).get("mismatched") == []
    if returncode != 0 and not checked:
        raise rank_failure(returncode, signals, run)
    if returncode != 0:
        # A known DeepSpeed/gloo quirk: a rank can abort at exit after all work is saved. Trust the outputs.
        log.warning("train: the launcher exited %d after the export was written and checked; continuing", returncode)
    if not checked:
        raise StageFailed(f"train: the ranks exited without a checked export in {run.final}; rerun to export again")
    metrics = read_jsonl(run.metrics)
    per_rank = [m["mfu_per_rank"] for m in metrics if "mfu_per_rank" in m]
    return dict(steps=export["steps"], num_params=export["num_params"], zero_stage=export["zero_stage"],
                ranks=export["ranks"], final_loss=metrics[-1]["loss"] if metrics else None,
                first_loss=metrics[0]["loss"] if metrics else None,
                tokens_per_s=round(sum(m["tokens_per_s"] for m in metrics) / max(len(metrics), 1), 1),
                mfu=round(sum(m["mfu"] for m in metrics) / max(len(metrics), 1), 4),
                mfu_per_rank=[round(sum(r) / len(r), 4) for r in zip(*per_rank)],
                mfu_peak=export.get("mfu_peak"),
                export_check={k: export["check"][k] for k in ("tensors", "max_abs_diff")},
                placement=export.get("placement"), launcher_exit_code=returncode)
