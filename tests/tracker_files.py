"""What TensorBoard, W&B (offline) and MLflow wrote, read back with their own libraries
(tests/unit/test_trackers.py, tests/integration/test_training.py). The tests folder is on sys.path
through its conftest.py."""
import json
import os
import struct
from pathlib import Path

from sa_sft.rundir import RunDir


def offline_trackers(monkeypatch, folder: Path) -> None:
    """W&B offline with its own logs and settings under `folder`, MLflow's store in the run directory:
    nothing reaches the network or the home directory."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_ERROR_REPORTING", "false")
    for var, name in (("WANDB_CACHE_DIR", "wandb-cache"), ("WANDB_CONFIG_DIR", "wandb-config"),
                      ("WANDB_DATA_DIR", "wandb-data")):
        monkeypatch.setenv(var, str(folder / name))
    # MLFLOW_ALLOW_FILE_STORE unset: sa-sft itself must opt in to the file store it writes.
    for var in ("WANDB_DIR", "WANDB_PROJECT", "MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_ALLOW_FILE_STORE"):
        monkeypatch.delenv(var, raising=False)


def wandb_records(path: Path):
    """The records of a .wandb file (LevelDB log format, W&B's header), decoded with W&B's own protobuf."""
    from wandb.proto import wandb_internal_pb2

    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B"
    pos, parts = 7, []
    while pos + 7 <= len(data):
        left = block - pos % block
        length, kind = struct.unpack("<HB", data[pos + 4:pos + 7])
        if left < 7 or (kind == 0 and length == 0):  # a block's zero-filled tail
            pos += left
            continue
        parts.append(data[pos + 7:pos + 7 + length])
        pos += 7 + length
        if kind in (1, 4):  # FULL, or LAST of FIRST/MIDDLE/LAST
            rec = wandb_internal_pb2.Record()
            rec.ParseFromString(b"".join(parts))
            parts = []
            yield rec


def wandb_runs(root: Path) -> list[dict]:
    """Each offline run folder, oldest first: its run id, config, history by step and summary."""
    runs = []
    for folder in sorted(root.glob("wandb/offline-run-*")):
        found = {"id": None, "config": {}, "history": {}, "summary": {}}
        for rec in wandb_records(next(folder.glob("run-*.wandb"))):
            kind = rec.WhichOneof("record_type")
            if kind == "run":
                found["id"] = rec.run.run_id
                found["config"] = {item.key: json.loads(item.value_json) for item in rec.run.config.update}
            elif kind == "history":
                items = {"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in rec.history.item}
                found["history"][items["_step"]] = items
            elif kind == "summary":
                found["summary"].update({"/".join(i.nested_key) or i.key: json.loads(i.value_json)
                                         for i in rec.summary.update})
        runs.append(found)
    return runs


def tensorboard_scalars(folder: Path) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))
    events.Reload()
    return {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}


def mlflow_client(run: RunDir):
    """A client on the run's MLflow file store (MLflow 3.13+ reads file stores only when asked to)."""
    from mlflow.tracking import MlflowClient

    os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"
    return MlflowClient(tracking_uri=run.mlflow_store.as_uri())


