"""Expected bad input ends with one clear message, never a traceback.

Recipes raise `UserError` for anything the user can fix (a missing column, an empty
file, a wrong encoding) and wrap their entry point with `cli_main`, which prints the
message and exits with status 2.
"""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class UserError(Exception):
    """An error in the user's input or settings; the message says what to fix."""


def cli_main(main: Callable[..., T]) -> Callable[..., T]:
    """Decorate a script's `main`: set up logging and turn `UserError` into `error: ...`."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        logging.basicConfig(
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
            datefmt="%H:%M:%S",
            level=logging.INFO,
        )
        try:
            result = main(*args, **kwargs)
        except UserError as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2)
        if main.__module__ == "__main__":  # a script's run, not a caller's library call
            _leave_process_group()
        return result

    return wrapper


def _leave_process_group() -> None:
    """End a distributed run's process group before the interpreter exits (only after success:
    after an error, other ranks may still be in a collective). A rank that exits holding a gloo
    group can abort at exit ("terminate called without an active exception", pytorch/pytorch#190489)
    while another rank still writes its outputs, and the launcher then fails the whole run."""
    torch = sys.modules.get("torch")  # never imported just for this
    if torch is not None and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
