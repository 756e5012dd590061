"""The exceptions a user sees: a clear, one-line message and an exit code, never a traceback."""


class UserError(Exception):
    """Bad config, bad input or a refused operation. The CLI prints `error: <message>` and exits 2."""

    exit_code = 2


class StorageError(UserError):
    """The disk refused a write (full, read-only, forbidden); every file written before is intact
    and a rerun resumes (exit 74, EX_IOERR)."""

    exit_code = 74


class Interrupted(UserError):
    """Stopped by a signal with the work saved; rerunning the same command resumes (exit 75, EX_TEMPFAIL)."""

    exit_code = 75

    def __init__(self, message: str, signal_name: str = "SIGTERM"):
        super().__init__(message)
        self.signal_name = signal_name


class StageFailed(UserError):
    """A stage's workers failed (a rank or engine died); its work up to the last checkpoint is kept
    and rerunning the same command resumes (exit 1)."""

    exit_code = 1
