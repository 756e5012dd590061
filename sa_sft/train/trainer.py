"""One rank of the sa-sft trainer: the program every launcher starts once per rank
(torchrun, the deepspeed launcher, srun, or a Ray actor):

    python -m sa_sft.train.trainer --config RUN/train/config.yaml --run-dir RUN

It runs the recipe (recipe.py) top to bottom. A bad setting found only here (a UserError) is
written to the run directory for the train stage to report as one line, and the rank exits 2.
"""
import argparse
import logging
import os
import sys
import warnings
from pathlib import Path

from sa_sft import console
from sa_sft.cache import use_own_ninja
from sa_sft.config import load_config
from sa_sft.errors import UserError
from sa_sft.io import atomic_write_json
from sa_sft.rundir import RunDir

log = logging.getLogger("sa_sft.train")


def main() -> int:
    parser = argparse.ArgumentParser(description="one rank of the sa-sft DeepSpeed trainer")
    parser.add_argument("--config", required=True)
    parser.add_argument("--run-dir", required=True, type=Path)
    parser.add_argument("--local_rank", "--local-rank", type=int, help="set by the deepspeed launcher; LOCAL_RANK wins")
    args = parser.parse_args()
    run = RunDir(args.run_dir)
    use_own_ninja()
    if not console.verbose():
        # Everything this rank prints (DeepSpeed, torch, transformers) goes to its own log file.
        rank = os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))
        console.redirect(run.output_log("train", f"rank-{rank}"))

    # DeepSpeed calls collectives that torch deprecates, once per parameter per step.
    warnings.filterwarnings("ignore", message=r".*torch\.distributed\..* is deprecated.*")
    from sa_sft.train.recipe import SFTRecipe

    try:
        recipe = SFTRecipe(load_config(args.config), run)
        recipe.setup()
        recipe.train()
        recipe.export()
    except UserError as e:
        atomic_write_json(run.rank_error, {"message": str(e), "exit_code": e.exit_code})
        log.error("error: %s", e)
        return e.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
