"""Runs stages in order on one run directory: each opened from its inputs (skipped when finished with
the same inputs, resumed when interrupted, refused when changed), run, and closed by its manifest."""
import contextlib
import logging
from pathlib import Path

from sa_sft.config import Config
from sa_sft.pipeline.preflight import preflight
from sa_sft.pipeline.report import write_report
from sa_sft.pipeline.stages import StageSpec, selected
from sa_sft.rundir import RunDir, os_error

log = logging.getLogger("sa_sft")


@contextlib.contextmanager
def log_to_file(path: Path):
    """Also write every log line to `path` for the duration (once, however deeply nested)."""
    root = logging.getLogger()
    if any(isinstance(h, logging.FileHandler) and Path(h.baseFilename) == path.resolve() for h in root.handlers):
        yield
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(path)
    except OSError as err:
        raise os_error(err) from None
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    root.addHandler(handler)
    try:
        yield
    finally:
        root.removeHandler(handler)
        handler.close()


def run_stage(spec: StageSpec, cfg: Config, run: RunDir, overwrite: bool) -> dict:
    """The one preamble of every stage: open it from its inputs, or read its manifest when it is done."""
    module = spec.load()
    stage = run.open_stage(spec.name, module.inputs(cfg, run), overwrite)
    if stage is None:
        return run.manifest(spec.name)
    return stage.finish(**module.run_stage(cfg, run, stage))


def run_stages(cfg: Config, stages: list[str], overwrite: bool = False) -> dict:
    run = RunDir(cfg.output_dir)
    preflight(cfg, stages)
    run.create()
    with run.locked():
        run.write_config(cfg.to_yaml())
        with log_to_file(run.log):
            for spec in selected(stages):
                log.info("== %s ==", spec.name)
                run_stage(spec, cfg, run, overwrite)
            report = write_report(run)
    log.info("report: %s", run.report_md)
    return report
