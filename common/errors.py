"""Expected bad input ends with one clear message, never a traceback.

Recipes raise `UserError` for anything the user can fix (a missing column, an empty
file, a wrong encoding) and wrap their entry point with `cli_main`, which prints the
message and exits with status 2.
"""

from __future__ import annotations

import functools
import logging
import os
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
    """End a distributed run's process group and leave (only after success: after an error, other
    ranks may still be in a collective). A rank whose gloo groups are destroyed by the interpreter's
    own teardown can abort there ("terminate called without an active exception", SIGABRT:
    pytorch/pytorch#190489, #179291) while another rank still writes its outputs, and the launcher
    then fails the whole run. destroy_process_group is not enough: DeepSpeed keeps its groups (its
    module globals, its engine and ZeRO optimiser) alive past it, and about 1 in 20-60 two-process
    ZeRO-3 runs aborted at exit that way. So a finished rank flushes its output and exits at once,
    without that teardown; everything it writes is written before main returns."""
    torch = sys.modules.get("torch")  # never imported just for this
    if torch is None or not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    torch.distributed.destroy_process_group()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
