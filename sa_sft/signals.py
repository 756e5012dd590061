"""Stop signals: SIGTERM (scancel, preemption) and SIGUSR1 (Slurm's time-limit warning, relayed by
srun) ask a stage to save its work and stop; a rerun resumes."""
import contextlib
import signal
from typing import Callable, Iterator

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def install(handler: Callable, signals=STOP_SIGNALS) -> dict:
    """Install `handler` for `signals`; returns the previous handlers (for `restore`)."""
    return {sig: signal.signal(sig, handler) for sig in signals}


def restore(previous: dict) -> None:
    for sig, handler in previous.items():
        signal.signal(sig, handler)


@contextlib.contextmanager
def handled(handler: Callable, signals=STOP_SIGNALS) -> Iterator[None]:
    """`handler` receives `signals` for the duration; the previous handlers come back after."""
    previous = install(handler, signals)
    try:
        yield
    finally:
        restore(previous)


def name(signum: int) -> str:
    return signal.Signals(signum).name
