"""The two errors the command-line scripts turn into one line on stderr instead of a traceback.

Anything else (a real bug) keeps its traceback.
"""


class UsageError(ValueError):
    """Bad input (a flag, a dataset, a model or checkpoint folder): the message names the problem and the fix.

    The CLIs exit with code 2, like argparse does for a bad flag.
    """

    exit_code = 2


class TrainingError(RuntimeError):
    """A run that cannot go on (diverged loss, stop signal, full disk, failed upload): the message says what was
    saved and what to do."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code
