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
            return main(*args, **kwargs)
        except UserError as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2)

    return wrapper
