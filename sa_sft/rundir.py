"""The run directory: the one module that names every file and folder of a run, writes and reads the
stage manifests, and loads what one stage hands to the next. Stages talk to each other only
through it. The layout is the contract in the README ("Outputs of a run"):

    RUN/config.yaml                      the fully resolved config
    RUN/sa_sft.log                       sa-sft's own log lines, every stage
    RUN/logs/STAGE[-engine-I|-rank-R].log what the libraries printed, per stage and process (quiet mode)
    RUN/STAGE/plan.json                  written when a stage starts: its inputs and their fingerprint
    RUN/STAGE/manifest.json              written last, atomically: what the stage produced
    RUN/generate/shards/shard-K.jsonl    accepted self-dialogues of shard K
    RUN/generate/rejected/shard-K.jsonl  dialogues the filters rejected, with the reason
    RUN/generate/minhash/shard-K.npz     shard K's duplicate-check signatures (a cache, remade when stale)
    RUN/mix/rank-R/                      tokenized training data of rank R (Arrow)
    RUN/mix/work/                        scratch Arrow files while the mix stage runs
    RUN/mix/heldout/{task,self}.jsonl    held-out task rows and self-dialogues
    RUN/train/final/                     the fine-tuned model (safetensors, tokenizer, chat template)
    RUN/train/metrics.jsonl, progress.json, checkpoints/, tensorboard/, train.log (rank 0's own lines)
    RUN/eval/{base,final}.json           scores per model; retention.json, drift.json, tensorboard/
    RUN/{train,evaluate}/trackers.json   the W&B / MLflow run ids a stage logged to (train.report_to)
    RUN/wandb/, RUN/mlruns/              W&B's run folders; MLflow's file store (unless MLFLOW_TRACKING_URI)
    RUN/plots/*.png, report.json, report.md, logs/

A stage whose manifest has the same fingerprint is skipped; one with a plan but no manifest
resumes; one made from a different config or different inputs is refused unless overwritten.
Every OS error on creating, locking or writing the run directory is one line (`os_error`).
"""
import contextlib
import errno
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from sa_sft.errors import StorageError, UserError
from sa_sft.hardware import recorded_environment, versions
from sa_sft.io import atomic_write_json, atomic_write_text, file_lock, read_json, read_jsonl, sha256_file, sha256_json

log = logging.getLogger("sa_sft.stage")

MANIFEST = "manifest.json"
PLAN = "plan.json"
HELDOUT_SETS = ("task", "self")

# What the disk or the permissions refused: the user's to fix, not a bug (exit 74). Any other OS
# error on the run directory (a file where a folder should be, a pseudo-filesystem) is bad input (2).
STORAGE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM)


def os_error(err: OSError, what: str = "the run directory") -> UserError:
    """One line for an OS error on `what`: a StorageError (74) for a full, read-only or forbidden
    disk, else a UserError (2) naming the path and the reason."""
    path = err.filename or what
    if err.errno in STORAGE_ERRNOS:
        return StorageError(f"cannot write {path}: {err.strerror}; every file written before is intact "
                            "(outputs are replaced atomically); free space or fix the permissions, then rerun to resume")
    reason = "a file is in the way" if err.errno in (errno.EEXIST, errno.ENOTDIR) else err.strerror or str(err)
    return UserError(f"cannot use {path} as {what}: {reason} (output_dir)")


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
    """An open stage: its folder, what it was asked to do, and `finish` to write the manifest last."""
    name: str
    dir: Path
    inputs: dict
    fingerprint: str
    resumed: bool = False
    started: float = field(default_factory=time.time)

    @property
    def manifest_path(self) -> Path:
        return self.dir / MANIFEST

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


class CheckpointDir:
    """train/checkpoints: one DeepSpeed checkpoint folder per tag (`step-0000042`), and `latest`,
    which names the newest checkpoint every rank finished saving."""

    PREFIX = "step-"

    def __init__(self, path: Path):
        self.path = Path(path)
        self.latest_file = self.path / "latest"

    @classmethod
    def tag(cls, step: int) -> str:
        return f"{cls.PREFIX}{step:07d}"

    def folder(self, tag: str) -> Path:
        return self.path / tag

    def tags(self) -> list[str]:
        """Every checkpoint folder on disk, oldest first (complete or not)."""
        return sorted(p.name for p in self.path.glob(f"{self.PREFIX}*") if p.is_dir())

    def rng_state(self, tag: str, rank: int) -> Path:
        return self.path / tag / f"rng_rank{rank}.pt"

    def latest(self) -> str | None:
        """The tag `latest` names, if that checkpoint is on disk."""
        if not self.latest_file.exists():
            return None
        tag = self.latest_file.read_text().strip()
        return tag if self.folder(tag).is_dir() else None

    def set_latest(self, tag: str) -> None:
        atomic_write_text(self.latest_file, tag)


class RunDir:
    """Every path of one run directory, its manifests, and the loaders between stages."""

    def __init__(self, root):
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"RunDir({str(self.root)!r})"

    # ---- the folder itself: created, locked, its config written; OS errors become one line
    def create(self) -> "RunDir":
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise os_error(err) from None
        return self

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Held for a whole run: a second sa-sft on the same directory is refused at once."""
        stack = contextlib.ExitStack()
        try:
            stack.enter_context(file_lock(self.root / ".lock", f"run directory {self.root}", wait=False))
        except OSError as err:
            raise os_error(err) from None
        with stack:
            yield

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    def write_config(self, text: str) -> None:
        try:
            atomic_write_text(self.config, text)
        except OSError as err:
            raise os_error(err) from None

    @property
    def log(self) -> Path:
        return self.root / "sa_sft.log"

    @property
    def logs_dir(self) -> Path:
        """Logs of helper processes (each node's Ray) and what the libraries printed in each stage."""
        return self.root / "logs"

    def output_log(self, stage: str, process: str = "") -> Path:
        """What vLLM, Ray, DeepSpeed, torch and transformers printed in a stage (quiet mode): the
        stage's own process, or one of its engines or ranks (`engine-0`, `rank-1`)."""
        return self.logs_dir / (f"{stage}-{process}.log" if process else f"{stage}.log")

    def ray_log(self, role: str, job_id: str) -> Path:
        return self.logs_dir / f"ray-{role}-job{job_id}.log"

    @property
    def slurm_probe(self) -> Path:
        """A token every node of a Slurm job must read back: the run directory is shared."""
        return self.root / ".slurm_probe"

    @property
    def report_json(self) -> Path:
        return self.root / "report.json"

    @property
    def report_md(self) -> Path:
        return self.root / "report.md"

    def plot(self, name: str) -> Path:
        return self.root / "plots" / f"{name}.png"

    # ---- stages: plan, manifest, skip / resume / refuse
    def stage_dir(self, name: str) -> Path:
        return self.root / name

    def manifest_path(self, name: str) -> Path:
        return self.stage_dir(name) / MANIFEST

    def finished(self, name: str) -> bool:
        return self.manifest_path(name).exists()

    def manifest(self, name: str) -> dict:
        path = self.manifest_path(name)
        if not path.exists():
            raise UserError(f"{path} is missing: run `sa-sft {name}` first (or `sa-sft run`)")
        return read_json(path)

    def fingerprint(self, name: str) -> str:
        """The finished stage's fingerprint: what a later stage's inputs name it by."""
        return self.manifest(name)["fingerprint"]

    def open_stage(self, name: str, inputs: dict, overwrite: bool = False) -> Stage | None:
        """Prepare a stage directory; None means it is already complete with these inputs (skip)."""
        stage_dir = self.stage_dir(name)
        fingerprint = sha256_json(inputs)
        for record in (MANIFEST, PLAN):
            path = stage_dir / record
            if not path.exists():
                continue
            previous = read_json(path)
            if previous.get("fingerprint") == fingerprint:
                if record == MANIFEST:
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
        try:
            stage_dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise os_error(err) from None
        atomic_write_json(stage_dir / PLAN, {"fingerprint": fingerprint, "inputs": inputs})
        return Stage(name, stage_dir, inputs, fingerprint)

    # ---- generate
    @property
    def shards_dir(self) -> Path:
        return self.stage_dir("generate") / "shards"

    @property
    def rejected_dir(self) -> Path:
        return self.stage_dir("generate") / "rejected"

    def shard(self, k: int) -> Path:
        return self.shards_dir / f"shard-{k:05d}.jsonl"

    def rejected_shard(self, k: int) -> Path:
        return self.rejected_dir / f"shard-{k:05d}.jsonl"

    def shard_signatures(self, k: int) -> Path:
        """Exact keys and MinHash signatures of shard k's user turns, tied to the shard's sha256
        inside the file (a changed or regenerated shard makes them stale, and they are remade)."""
        return self.stage_dir("generate") / "minhash" / f"shard-{k:05d}.npz"

    @property
    def selection_rejects(self) -> Path:
        """Dialogues dropped when the shards were walked in order (duplicates, contamination)."""
        return self.rejected_dir / "selection.jsonl"

    def shards_on_disk(self) -> set[int]:
        return {int(p.stem.split("-")[1]) for p in self.shards_dir.glob("shard-*.jsonl")}

    def remove_stale_writes(self, name: str) -> None:
        """Temporary files of writes a crash cut short: never read, removed on resume."""
        for stale in self.stage_dir(name).rglob(".*.tmp"):
            stale.unlink()

    def shard_record(self, k: int, take: int, skip: list[str], rows: int, sha256: str | None = None) -> dict:
        """What the generate manifest lists for shard k: which of its rows were selected, and its hash
        (`sha256` when the caller already hashed the file's bytes)."""
        path = self.shard(k)
        return {"file": str(path.relative_to(self.stage_dir("generate"))), "rows": rows, "take": take,
                "skip": skip, "sha256": sha256 or sha256_file(path)}

    def iter_selected(self, shards: list[dict]) -> Iterator[dict]:
        """The rows the shard records select, one shard in memory at a time, each file checked
        against its recorded hash before any of its rows is given."""
        for shard in shards:
            path = self.stage_dir("generate") / shard["file"]
            if sha256_file(path) != shard["sha256"]:
                raise UserError(f"{path} changed since generation (hash mismatch); rerun generate with --overwrite")
            skip = set(shard["skip"])
            yield from (row for row in read_jsonl(path)[: shard["take"]] if row["id"] not in skip)

    def load_selected(self, shards: list[dict]) -> list[dict]:
        return list(self.iter_selected(shards))

    def iter_self_dialogues(self) -> Iterator[dict]:
        """The accepted self-dialogues (or rewrites) the generate manifest lists, checked against their hashes."""
        return self.iter_selected(self.manifest("generate")["shards"])

    def load_self_dialogues(self) -> list[dict]:
        return list(self.iter_self_dialogues())

    # ---- mix
    def rank_data(self, rank: int) -> Path:
        return self.stage_dir("mix") / f"rank-{rank:05d}"

    @property
    def mix_work(self) -> Path:
        """The mix stage's scratch space (the rows and their tokens as Arrow files); removed when it ends."""
        return self.stage_dir("mix") / "work"

    @property
    def mix_sources(self) -> Path:
        """Every candidate row (task, self, external) as read, in one Arrow file; map writes the tokens next to it."""
        return self.mix_work / "sources.arrow"

    def mix_rank_rows(self, rank: int) -> Path:
        """Rank R's rows as one Arrow file before they are saved as the rank's dataset."""
        return self.mix_work / f"rank-{rank:05d}.arrow"

    def heldout(self, name: str) -> Path:
        assert name in HELDOUT_SETS, name
        return self.stage_dir("mix") / "heldout" / f"{name}.jsonl"

    def heldout_rows(self, name: str) -> list[dict]:
        return read_jsonl(self.heldout(name))

    # ---- train
    @property
    def train_config(self) -> Path:
        """The config every rank reads (absolute paths: ranks may start elsewhere)."""
        return self.stage_dir("train") / "config.yaml"

    @property
    def train_log(self) -> Path:
        return self.stage_dir("train") / "train.log"

    @property
    def train_progress(self) -> Path:
        """Rank 0's step, total and last loss, rewritten every step: the train stage's progress bar."""
        return self.stage_dir("train") / "progress.json"

    @property
    def metrics(self) -> Path:
        return self.stage_dir("train") / "metrics.jsonl"

    @property
    def tensorboard(self) -> Path:
        return self.stage_dir("train") / "tensorboard"

    @property
    def checkpoints(self) -> CheckpointDir:
        return CheckpointDir(self.stage_dir("train") / "checkpoints")

    @property
    def final(self) -> Path:
        """The fine-tuned model: a Hugging Face folder."""
        return self.stage_dir("train") / "final"

    @property
    def export_record(self) -> Path:
        """Written last into the exported folder: the step it holds and the check of every tensor."""
        return self.final / "sa_sft_export.json"

    @property
    def rejected_export(self) -> Path:
        """An export whose check failed, kept for inspection; the rerun exports again."""
        return self.stage_dir("train") / "final.rejected"

    @property
    def interrupted(self) -> Path:
        """Written by rank 0 when a stop signal made the ranks checkpoint and exit."""
        return self.stage_dir("train") / "interrupted.json"

    @property
    def rank_error(self) -> Path:
        """Written by a rank that stopped on a bad setting, so the driver can say what it was."""
        return self.stage_dir("train") / "error.json"

    # ---- evaluate
    @property
    def eval_dir(self) -> Path:
        return self.root / "eval"

    def scores(self, model: str) -> Path:
        """eval/base.json, eval/final.json: every suite's score for one model."""
        return self.eval_dir / f"{model}.json"

    def generations(self, model: str) -> Path:
        """Every generated answer of one model with its verdict."""
        return self.eval_dir / f"{model}-generations.jsonl"

    @property
    def kl_samples(self) -> Path:
        """The base model's sampled answers (tokens, log-probabilities) the KL estimate is made on."""
        return self.eval_dir / "base-kl-samples.jsonl"

    @property
    def chat_samples(self) -> Path:
        """The base model's sampled answers to held-out ShareGPT prompts (`evaluate.chat_heldout`)."""
        return self.eval_dir / "base-chat-samples.jsonl"

    @property
    def retention(self) -> Path:
        return self.eval_dir / "retention.json"

    @property
    def drift(self) -> Path:
        return self.eval_dir / "drift.json"

    # ---- experiment trackers (train.report_to, sa_sft/trackers.py)
    def tracker_runs(self, stage: str) -> Path:
        """The W&B and MLflow run ids a stage opened ({tracker: id}): a later process (a resumed
        training, the evaluate stage) logs into the same tracker runs."""
        return self.stage_dir(stage) / "trackers.json"

    @property
    def wandb_dir(self) -> Path:
        """wandb.init(dir=...): W&B keeps its run folders (offline-run-*, run-*) in wandb/ under it."""
        return self.root

    @property
    def mlflow_store(self) -> Path:
        """MLflow's local file store, used when MLFLOW_TRACKING_URI is unset."""
        return self.root / "mlruns"

    @property
    def eval_tensorboard(self) -> Path:
        """The evaluation summary as TensorBoard scalars (next to train/tensorboard under `--logdir RUN`)."""
        return self.eval_dir / "tensorboard"

    def relative(self, path: Path) -> str:
        return str(Path(path).relative_to(self.root))


class CompareDir:
    """`sa-sft compare`'s output_dir: one run directory per method, and the comparison next to them."""

    def __init__(self, root):
        self.root = Path(root)

    def method(self, name: str) -> RunDir:
        return RunDir(self.root / name)

    @property
    def json(self) -> Path:
        return self.root / "compare.json"

    @property
    def markdown(self) -> Path:
        return self.root / "compare.md"

    def plot(self, name: str) -> Path:
        return self.root / "plots" / f"{name}.png"
