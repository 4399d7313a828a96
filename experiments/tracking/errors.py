"""A problem with the user's input, raised anywhere in the library, ends a run as one line and a FAILED record."""
from __future__ import annotations

import argparse
import functools
from typing import Any, Callable

from sacred.utils import SacredError

from shared.distributed import launched
from shared.errors import UserFacingError


def which_process() -> str:
    """'rank 1 of 2: ' in a process torchrun started (every process prints its own line), else ''."""
    try:
        processes = launched()
    except UserFacingError:  # torchrun's variables garbled: that error names them itself
        return ""
    return f"{processes.describe()}: " if processes.several else ""


class RunError(SacredError):
    """A problem with the user's input: printed as one line (naming the process in a distributed run), and the run
    is recorded as FAILED."""

    def __init__(self, message: str) -> None:
        super().__init__(which_process() + message, print_traceback=False)


class Terminated(KeyboardInterrupt):
    """SIGTERM (a batch scheduler's stop, `kill`), raised where the run is: a KeyboardInterrupt, so that no
    `except Exception` on the way (Sacred's observer calls, a data loader's) swallows or rewords it; Sacred records
    the run as INTERRUPTED and `run_commandline` prints it as one line."""

    STATUS = "INTERRUPTED"


def user_errors(function: Callable[..., Any]) -> Callable[..., Any]:
    """Turn a UserFacingError raised by library code into a one-line RunError."""

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return function(*args, **kwargs)
        except UserFacingError as error:
            raise RunError(str(error)) from None

    return wrapper


class OneLineParser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line (argparse prints the usage first) and exit 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (--help lists the arguments)\n")
