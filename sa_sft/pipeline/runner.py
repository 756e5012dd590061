"""Runs stages in order on one run directory: each opened from its inputs (skipped when finished with
the same inputs, resumed when interrupted, refused when changed), run, and closed by its manifest."""
import contextlib
import logging
from pathlib import Path

from sa_sft import console
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
    # The libraries' records go to each stage's own log (RUN/logs/), not this one.
    handler.addFilter(console.OwnRecords(True))
    root.addHandler(handler)
    try:
        yield
    finally:
        root.removeHandler(handler)
        handler.close()


@contextlib.contextmanager
def stage_output(run: RunDir, name: str):
    """The libraries' output of a stage in RUN/logs/NAME*.log (quiet mode); afterwards one line on
    what in it looks like a real warning or error, not start-up chatter."""
    if console.verbose():
        yield
        return
    logs = lambda: sorted(run.logs_dir.glob(f"{name}*.log"))  # noqa: E731 (the stage adds engine and rank logs)
    before = console.sizes(logs())
    try:
        with console.capture(run.output_log(name)):
            yield
    finally:
        found = console.problems(logs(), before)
        if found:
            log.warning("%s: %d warning or error line(s) from the libraries, first: %s (all output: %s)",
                        name, len(found), found[0][:160], run.logs_dir)


def run_stage(spec: StageSpec, cfg: Config, run: RunDir, overwrite: bool) -> dict:
    """The one preamble of every stage: open it from its inputs, or read its manifest when it is done."""
    module = spec.load()
    stage = run.open_stage(spec.name, module.inputs(cfg, run), overwrite)
    if stage is None:
        return run.manifest(spec.name)
    with stage_output(run, spec.name):
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


def dry_run(cfg: Config, stages: list[str]) -> dict:
    """What the stages would start, and where, without running them: the engines placed as probes on
    Ray (their nodes and devices), the training ranks placed by their launcher. Writes nothing."""
    from sa_sft.cluster.ray_cluster import ray_session
    from sa_sft.engines.pool import dry_run as engines_dry_run
    from sa_sft.train.launchers import dry_run as ranks_dry_run

    preflight(cfg, stages)
    run = RunDir(cfg.output_dir)
    report = {}
    if {"generate", "evaluate"} & set(stages):
        with ray_session(cfg.cluster.ray_address) as own_machine:
            report["engines"] = engines_dry_run(cfg.generate, own_machine)
    if "train" in stages:
        report["train"] = ranks_dry_run(cfg, run)
    return report
