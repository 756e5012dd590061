"""The stage registry: every stage declared once, in pipeline order.

The CLI (its commands and help), the pipeline (`run_stages`), the Slurm driver (`sa-sft slurm`)
and `launchers/ray_submit.py` all read this list. A stage's module provides

    inputs(cfg, run) -> dict           what decides its outputs (hashed: skip, resume or refuse)
    run_stage(cfg, run, stage) -> dict  the work; the manifest fields it returns are written last

and is imported only when the stage runs (each pulls in heavy libraries: vLLM and Ray,
datasets, DeepSpeed). This module stays light: the CLI's --help reads it.
"""
import importlib
from dataclasses import dataclass
from types import ModuleType
from typing import Callable

from sa_sft.rundir import RunDir


@dataclass(frozen=True)
class StageSpec:
    name: str
    module: str
    help: str
    outputs: Callable   # RunDir -> the main paths it leaves in the run directory (besides its manifest)
    slurm_step: str     # the `sa-sft slurm STEP` (and slurm/STEP.sbatch) that runs it
    on_slurm: str       # "ray": its engines on a Ray cluster over the allocation; "ranks": one srun task
                        # per rank; "head": on the job's first node
    ray_job: bool = True  # may run as a Ray job (launchers/ray_submit.py --stage NAME)

    def load(self) -> ModuleType:
        return importlib.import_module(self.module)

    def describe_outputs(self) -> str:
        run = RunDir("RUN")
        return ", ".join(str(path) for path in self.outputs(run))


STAGES = (
    StageSpec("generate", "sa_sft.generate.stage",
              "the frozen base model writes self-dialogues (vLLM engines on Ray)",
              lambda run: (run.shards_dir, run.rejected_dir), slurm_step="generate", on_slurm="ray"),
    StageSpec("mix", "sa_sft.mix.stage",
              "mix task data and self-dialogues at mix.self_ratio, tokenize, shard per rank",
              lambda run: (run.rank_data(0), run.heldout("task"), run.heldout("self")),
              slurm_step="train", on_slurm="head"),
    StageSpec("train", "sa_sft.train.stage",
              "full-parameter DeepSpeed ZeRO training on the mixed data; exports the fine-tuned model",
              lambda run: (run.final, run.metrics, run.checkpoints.path), slurm_step="train", on_slurm="ranks"),
    StageSpec("evaluate", "sa_sft.evaluate.stage",
              "score the base and the fine-tuned model on held-out task data, self-dialogues and general suites",
              lambda run: (run.scores("base"), run.scores("final"), run.retention, run.drift),
              slurm_step="evaluate", on_slurm="ray"),
)
STAGE_NAMES = tuple(spec.name for spec in STAGES)
# `sa-sft slurm STEP`: the stages each step runs; `check` only checks the nodes, `run` does everything.
SLURM_STEPS = {"check": [], **{step: [s.name for s in STAGES if s.slurm_step == step]
                               for step in dict.fromkeys(s.slurm_step for s in STAGES)},
               "run": list(STAGE_NAMES)}


def spec(name: str) -> StageSpec:
    return next(s for s in STAGES if s.name == name)


def selected(names) -> list[StageSpec]:
    """The named stages, in pipeline order."""
    return [s for s in STAGES if s.name in names]
