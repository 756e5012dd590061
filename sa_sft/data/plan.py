"""How much data a run needs: the arithmetic generate and mix share (pure functions of the config
and the task set's size), so generation makes exactly what the mix will take."""
from sa_sft.config import Config
from sa_sft.errors import UserError


def task_train_count(cfg: Config, task_rows: int) -> int:
    """Task rows left for training after `data.max_task_samples` and the held-out ones."""
    return max(0, min(task_rows, cfg.data.max_task_samples or task_rows) - cfg.data.heldout_task)


def self_samples_needed(cfg: Config, task_rows: int) -> int:
    """Self-dialogues the mix will use: lambda x training task rows, plus the held-out ones."""
    return round(cfg.mix.self_ratio * task_train_count(cfg, task_rows)) + cfg.data.heldout_self


def check_self_supply(cfg: Config, task_rows: int) -> None:
    """Fail before generation if generate.num_samples cannot cover lambda x task rows + the held-out ones."""
    needed = self_samples_needed(cfg, task_rows)
    if cfg.generate.strategy != "rewrite" and cfg.mix.ratio_unit == "samples" and 0 <= cfg.generate.num_samples < needed:
        raise UserError(f"config key generate.num_samples ({cfg.generate.num_samples}) is too small: "
                        f"mix.self_ratio={cfg.mix.self_ratio} x {task_train_count(cfg, task_rows)} task rows "
                        f"+ data.heldout_self={cfg.data.heldout_self} needs {needed}")
