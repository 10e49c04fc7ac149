"""Argument dataclasses from an optional YAML file plus command-line overrides.

    python recipe/train.py configs/default.yaml --learning_rate 1e-3

The YAML file (first positional argument) sets the defaults; flags given on the command
line win. Keys that no dataclass declares are an error that names them, so a typo in a
config never silently falls back to a default.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from transformers import HfArgumentParser

from common.errors import UserError


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Show each option's default, and the script's docstring as written."""


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise UserError(f"{path}: not valid YAML: {err}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping of key: value, got {type(data).__name__}")
    return data


def parse_args(dataclass_types: Sequence[type], args: Sequence[str] | None = None,
               description: str | None = None) -> tuple:
    """Parse `[CONFIG.yaml] [--key value ...]` into one instance of each dataclass.

    Returns the instances in the order of `dataclass_types`. `description` (a script's
    docstring, say) heads the `--help` text.
    """
    args = list(sys.argv[1:] if args is None else args)
    parser = HfArgumentParser(
        list(dataclass_types), description=description,
        formatter_class=_HelpFormatter,
    )

    config: dict[str, Any] = {}
    if args and not args[0].startswith("-") and args[0].endswith((".yaml", ".yml")):
        config_path = args.pop(0)
        config = load_yaml(config_path)
        known = {action.dest for action in parser._actions}
        unknown = sorted(set(config) - known)
        if unknown:
            raise UserError(
                f"{config_path}: unknown key(s): {', '.join(unknown)} "
                "(see --help for the accepted keys)"
            )
        # YAML values become the parser's defaults, so CLI flags still override them.
        # String values go through the same type conversion as CLI strings (argparse
        # converts string defaults), which also fixes YAML reading `1e-3` as a string.
        for action in parser._actions:
            if action.dest in config:
                action.required = False
        parser.set_defaults(**config)

    instances = parser.parse_args_into_dataclasses(
        args=args, return_remaining_strings=True, look_for_args_file=False
    )
    *parsed, remaining = instances
    if remaining:
        raise UserError(f"unknown argument(s): {' '.join(remaining)} (see --help)")
    return tuple(parsed)
