"""Training progress through the run directory: rank 0 rewrites `train/progress.json` every step;
the train stage, which only launched the ranks (they may run on other nodes, their output in
RUN/logs/), draws the progress bar from it and echoes rank 0's own log lines (`train/train.log`)."""
import json
import time

from tqdm import tqdm

from sa_sft import console
from sa_sft.io import atomic_write_json
from sa_sft.rundir import RunDir


class ProgressFile:
    """Rank 0's side: the calls of a tqdm bar, written to a file instead of a terminal."""

    def __init__(self, path, total: int, step: int):
        self.path, self.state = path, {"step": step, "total": total}
        self.last_write = 0.0
        self._write()

    def _write(self) -> None:
        atomic_write_json(self.path, self.state)
        self.last_write = time.time()

    def set_postfix(self, **values) -> None:
        self.state.update(values)

    def update(self, n: int = 1) -> None:
        self.state["step"] += n
        if time.time() - self.last_write >= 0.5 or self.state["step"] >= self.state["total"]:
            self._write()

    def close(self) -> None:
        self._write()


class Follower:
    """The train stage's side: call `poll()` while the launcher runs, `close()` after."""

    def __init__(self, run: RunDir):
        self.run, self.bar = run, None
        run.train_progress.unlink(missing_ok=True)  # a previous attempt's
        self.offset = run.train_log.stat().st_size if run.train_log.exists() else 0
        # In verbose mode the ranks print their own lines to the terminal.
        self.echo = not console.verbose()

    def poll(self) -> None:
        if self.echo and self.run.train_log.exists():
            with open(self.run.train_log, "rb") as f:
                f.seek(self.offset)
                text = f.read()
            complete = text[: text.rfind(b"\n") + 1]
            self.offset += len(complete)
            for line in complete.decode("utf-8", errors="replace").splitlines():
                tqdm.write(line, file=console.stream())
        try:
            state = json.loads(self.run.train_progress.read_text())
        except (OSError, ValueError):
            return
        if self.bar is None:
            self.bar = tqdm(total=state["total"], initial=state["step"], unit="step", desc="train",
                            dynamic_ncols=True, file=console.stream())
        self.bar.n = state["step"]
        postfix = {k: v for k, v in state.items() if k not in ("step", "total")}
        if postfix:
            self.bar.set_postfix(postfix, refresh=False)
        self.bar.refresh()

    def close(self) -> None:
        self.poll()
        if self.bar is not None:
            self.bar.close()
