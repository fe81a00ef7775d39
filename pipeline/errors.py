"""The two errors the command-line scripts turn into one line on stderr instead of a traceback, and the one place
that does it (`one_line_errors`). Anything else (a real bug) keeps its traceback.
"""

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager


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


@contextmanager
def one_line_errors(on_error: Callable[[], None] | None = None, interrupted: str | None = None) -> Iterator[None]:
    """Every entry point's error path: a `UsageError` or `TrainingError` raised in the block ends the program with
    `error: <message>` on stderr and the error's own exit code (2 for bad input, 1 or 128 + signal for a run that
    could not go on), after `on_error()` (e.g. removing a folder the run created and left empty). With `interrupted`,
    Ctrl-C ends it with that line and exit code 130.
    """
    try:
        yield
    except (UsageError, TrainingError) as error:
        if on_error is not None:
            on_error()
        print(f"error: {error}", file=sys.stderr)
        sys.exit(error.exit_code)
    except KeyboardInterrupt:
        if interrupted is None:
            raise
        print(f"error: {interrupted}", file=sys.stderr)
        sys.exit(130)
