"""Experiment trackers (`train.report_to`): TensorBoard, Weights & Biases, MLflow.

Rank 0 of training logs every line of train/metrics.jsonl to each tracker (`train/loss`, ...; a
per-rank list as one curve per rank) and, when it creates the tracker run, the run config. The
evaluate stage, in another process and maybe much later, logs the evaluation summary (`eval/...`)
into the same tracker run: the W&B and MLflow run ids are kept in the run directory
(RunDir.tracker_runs) and resumed (a run without training gets tracker runs of its own).

Where each writes:
  tensorboard  train/tensorboard/ and eval/tensorboard/ (`tensorboard --logdir RUN` shows both)
  wandb        $WANDB_DIR if set, else RUN/wandb/; WANDB_MODE=offline keeps everything there
               (`wandb sync` uploads it later; a resumed run is one more folder with the same id)
  mlflow       $MLFLOW_TRACKING_URI if set, else a file store in RUN/mlruns/
Project (W&B) and experiment (MLflow): train.tracker_project, else $WANDB_PROJECT or
$MLFLOW_EXPERIMENT_NAME, else sa-sft; the tracker run is named after the run directory.

A tracker that fails while a stage runs (a server gone, a full disk) is dropped for the rest of that
process with one warning: a tracker never costs a training run, and metrics.jsonl has every line.
Whether each tracker can work at all is checked before any stage starts (`check_trackers`).
"""
import atexit
import importlib.util
import json
import logging
import netrc
import os
import time
from pathlib import Path
from urllib.parse import urlparse

from sa_sft.config import Config
from sa_sft.errors import UserError
from sa_sft.io import atomic_write_json, read_json
from sa_sft.rundir import RunDir

log = logging.getLogger("sa_sft.trackers")

DEFAULT_PROJECT = "sa-sft"
# The package each tracker imports, and what to install when it is missing (pyproject.toml pins these).
PACKAGES = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb==0.31.0"),
            "mlflow": ("mlflow", "mlflow-skinny==3.17.2")}
# MLflow's batch limits (mlflow.utils.validation): params per call, characters per value.
MLFLOW_PARAMS_PER_BATCH, MLFLOW_METRICS_PER_BATCH, MLFLOW_PARAM_CHARS = 100, 1000, 6000


def enabled(cfg: Config) -> list[str]:
    return list(dict.fromkeys(cfg.train.report_to))


def project(cfg: Config, env: str) -> str:
    return cfg.train.tracker_project or os.environ.get(env) or DEFAULT_PROJECT


# ---- before any stage
def check_trackers(cfg: Config) -> None:
    """Each tracker's package is importable, W&B online has credentials, and a tracking URI the user
    set works: one line now rather than a failed tracker after hours of generation."""
    for name in enabled(cfg):
        module, package = PACKAGES[name]
        if not importable(module):
            raise UserError(f"config key train.report_to names {name}, but the {module} package is not installed: "
                            f"pip install '{package}' (or leave {name} out of train.report_to)")
    if "wandb" in enabled(cfg) and wandb_online() and not wandb_credentials():
        raise UserError("config key train.report_to names wandb, which logs online, but no W&B API key is set "
                        "(WANDB_API_KEY or `wandb login`); set WANDB_MODE=offline to keep the W&B run on disk "
                        "and `wandb sync` it later")
    if "mlflow" in enabled(cfg) and os.environ.get("MLFLOW_TRACKING_URI"):
        uri = os.environ["MLFLOW_TRACKING_URI"]
        try:
            from mlflow.tracking import MlflowClient
            MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
        except Exception as err:  # noqa: BLE001 (MLflow raises many kinds: the message says which)
            raise UserError(f"config key train.report_to names mlflow, but MLFLOW_TRACKING_URI={uri} does not "
                            f"work: {one_line(err)}") from None


def importable(module: str) -> bool:
    """Found without importing it (wandb and mlflow take seconds to import)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # ValueError: a module set to None in sys.modules (import blocked)
        return False


def wandb_online() -> bool:
    mode = os.environ.get("WANDB_MODE", "online").lower()
    return mode in ("online", "run", "shared") and os.environ.get("WANDB_DISABLED", "").lower() not in ("true", "1")


def wandb_credentials() -> bool:
    """An API key W&B would find without asking: the environment, or a netrc entry for its host."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    path = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return netrc.netrc(str(path)).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def one_line(err: Exception) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text[:300] + (" ..." if len(text) > 300 else "")


# ---- what is logged
def train_scalars(record: dict) -> dict:
    """One metrics.jsonl line as scalars: `train/KEY`, a per-rank list as `train/KEY_rankR`."""
    scalars = {}
    for key, value in record.items():
        if isinstance(value, list):
            scalars.update({f"train/{key}_rank{rank}": v for rank, v in enumerate(value)})
        elif key != "step" and value is not None:
            scalars[f"train/{key}"] = value
    return {k: float(v) for k, v in scalars.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def flatten(values: dict, prefix: str) -> dict:
    """Nested numbers as `prefix/a/b`: the evaluation summary as scalars (None and text left out)."""
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}/{key}"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            flat[f"{prefix}/{key}"] = float(value)
    return flat


def config_params(cfg: Config) -> dict:
    """The run config as `section.key` -> text (MLflow's params)."""
    params = {}
    for section, fields in cfg.to_dict().items():
        for key, value in (fields.items() if isinstance(fields, dict) else [("", fields)]):
            name = f"{section}.{key}" if key else section
            params[name] = (value if isinstance(value, str) else json.dumps(value))[:MLFLOW_PARAM_CHARS]
    return params


# ---- the trackers
class TensorBoard:
    name = "tensorboard"

    def __init__(self, cfg: Config, folder: Path, resume_step: int | None):
        from torch.utils.tensorboard import SummaryWriter

        fresh = not any(Path(folder).glob("events.out.tfevents.*"))
        # purge_step: a resumed training drops the events past its checkpoint, as metrics.jsonl does.
        self.writer = SummaryWriter(str(folder), purge_step=None if resume_step is None else resume_step + 1)
        if fresh:  # the config once, as text (indented: TensorBoard renders markdown)
            self.writer.add_text("config", "".join(f"    {line}\n" for line in cfg.to_yaml().splitlines()),
                                 resume_step or 0)

    def log(self, scalars: dict, step: int) -> None:
        for key, value in scalars.items():
            self.writer.add_scalar(key, value, step)

    summary = log

    def close(self, status: str) -> None:
        self.writer.close()


class Wandb:
    name = "wandb"

    def __init__(self, cfg: Config, run: RunDir, run_id: str | None, job: str):
        import wandb

        kwargs = dict(project=project(cfg, "WANDB_PROJECT"), name=run.root.name,
                      # silent: no banner or links on the terminal; console off: W&B does not wrap stdout/stderr
                      settings=wandb.Settings(silent=True, console="off"))
        if not os.environ.get("WANDB_DIR"):
            run.wandb_dir.mkdir(parents=True, exist_ok=True)
            kwargs["dir"] = str(run.wandb_dir)
        if run_id:
            kwargs.update(id=run_id, resume="allow")
        else:
            kwargs.update(config=cfg.to_dict(), job_type=job)
        self.run = wandb.init(**kwargs)
        self.id = self.run.id
        # A resumed online run continues after its last step; W&B would drop earlier steps anyway.
        self.next_step = self.run.step

    def log(self, scalars: dict, step: int) -> None:
        if step >= self.next_step:
            self.run.log(scalars, step=step)

    def summary(self, scalars: dict, step: int) -> None:
        self.run.summary.update(scalars)

    def close(self, status: str) -> None:
        self.run.finish(exit_code=0 if status == "FINISHED" else 1)


class Mlflow:
    name = "mlflow"

    def __init__(self, cfg: Config, run: RunDir, run_id: str | None, job: str):
        from mlflow.tracking import MlflowClient

        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:
            # MLflow 3.13+ refuses file stores unless asked: this one is ours, and a folder of plain files
            # in the run directory works on any shared filesystem (SQLite does not) and needs no server.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            uri = run.mlflow_store.resolve().as_uri()
        self.client = MlflowClient(tracking_uri=uri)
        if run_id:
            self.id = run_id
            self.client.update_run(run_id, status="RUNNING")
            # A resumed training logs again from its checkpoint: keep the steps MLflow already has once.
            history = self.client.get_metric_history(run_id, "train/loss")
            self.next_step = max((m.step for m in history), default=-1) + 1
            return
        name = project(cfg, "MLFLOW_EXPERIMENT_NAME")
        experiment = self.client.get_experiment_by_name(name)
        experiment_id = experiment.experiment_id if experiment else self.create_experiment(name)
        self.id = self.client.create_run(experiment_id, run_name=run.root.name,
                                         tags={"sa_sft.output_dir": str(run.root.resolve()), "sa_sft.job": job}
                                         ).info.run_id
        self.next_step = 0
        from mlflow.entities import Param
        params = [Param(k, v) for k, v in config_params(cfg).items()]
        for i in range(0, len(params), MLFLOW_PARAMS_PER_BATCH):
            self.client.log_batch(self.id, params=params[i:i + MLFLOW_PARAMS_PER_BATCH])

    def create_experiment(self, name: str) -> str:
        from mlflow.exceptions import MlflowException

        try:
            return self.client.create_experiment(name)
        except MlflowException:  # another run created it meanwhile
            return self.client.get_experiment_by_name(name).experiment_id

    def log(self, scalars: dict, step: int) -> None:
        if step >= self.next_step:
            self.summary(scalars, step)

    def summary(self, scalars: dict, step: int) -> None:
        from mlflow.entities import Metric
        now = int(time.time() * 1000)
        metrics = [Metric(key, value, now, step) for key, value in scalars.items()]
        for i in range(0, len(metrics), MLFLOW_METRICS_PER_BATCH):
            self.client.log_batch(self.id, metrics=metrics[i:i + MLFLOW_METRICS_PER_BATCH])

    def close(self, status: str) -> None:
        self.client.set_terminated(self.id, status=status)


class Trackers:
    """The trackers of train.report_to, open in one process: rank 0 of training or the evaluate stage."""

    def __init__(self, cfg: Config, run: RunDir, stage: str, resume_step: int | None = None):
        """`resume_step`: training's step when it starts (0: from scratch); None for the evaluate stage."""
        self.open, self.closed = [], False
        ids_file = run.tracker_runs(stage)
        # Training's tracker runs, else this stage's own from an earlier attempt (a run without training).
        known = {**(read_json(ids_file) if ids_file.exists() else {}),
                 **(read_json(run.tracker_runs("train")) if run.tracker_runs("train").exists() else {})}
        made = {}
        for name in enabled(cfg):
            try:
                if name == "tensorboard":
                    tracker = TensorBoard(cfg, run.tensorboard if stage == "train" else run.eval_tensorboard,
                                          resume_step)
                else:
                    tracker = (Wandb if name == "wandb" else Mlflow)(cfg, run, known.get(name), stage)
                    if known.get(name) != tracker.id:
                        made[name] = tracker.id
            except Exception as err:  # noqa: BLE001 (see the module's docstring)
                log.warning("%s: could not start (%s); nothing goes to it from the %s stage", name, one_line(err), stage)
                continue
            self.open.append(tracker)
        if made:
            atomic_write_json(ids_file, {**(read_json(ids_file) if ids_file.exists() else {}), **made})
        # A process that ends on an exception still closes its tracker runs (as failed); a SIGKILL
        # leaves them open, and the rerun resumes them.
        self._at_exit = lambda: self.close("FAILED")
        atexit.register(self._at_exit)

    def __bool__(self) -> bool:
        return bool(self.open)

    def _each(self, what: str, call) -> None:
        for tracker in list(self.open):
            try:
                call(tracker)
            except Exception as err:  # noqa: BLE001 (see the module's docstring)
                log.warning("%s: %s failed (%s); nothing more goes to it from this process "
                            "(the run directory keeps every metric)", tracker.name, what, one_line(err))
                self.open.remove(tracker)

    def log_metrics(self, record: dict) -> None:
        """One line of train/metrics.jsonl, at its step."""
        scalars = train_scalars(record)
        self._each("logging", lambda t: t.log(scalars, record["step"]))

    def log_summary(self, summary: dict, step: int) -> None:
        """The evaluation summary (nested numbers) as `eval/...` scalars at `step` (training's last)."""
        scalars = flatten(summary, "eval")
        self._each("logging the evaluation summary", lambda t: t.summary(scalars, step))

    def close(self, status: str = "FINISHED") -> None:
        """FINISHED, or KILLED for a stop that a rerun resumes, or FAILED."""
        if not self.closed:
            self.closed = True
            atexit.unregister(self._at_exit)
            self._each("closing", lambda t: t.close(status))


def log_evaluation(cfg: Config, run: RunDir, summary: dict) -> None:
    """The evaluate stage's summary into the run's tracker runs, at training's last step."""
    if not enabled(cfg):
        return
    step = run.manifest("train").get("steps", 0) if run.finished("train") else 0
    trackers = Trackers(cfg, run, "evaluate")
    try:
        trackers.log_summary(summary, step)
    finally:
        trackers.close()
