"""The one exception type a user sees: a clear, one-line message, exit code 2."""


class UserError(Exception):
    """Bad config, bad input or a refused operation. The CLI prints `error: <message>` and exits 2."""
