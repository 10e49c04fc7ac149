"""Import a recipe's script (`<recipe>/train.py`) as a module, as the benchmarks need: every
recipe has its own train.py, so each gets a unique module name."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def load_recipe_script(recipe: str, name: str = "train"):
    spec = importlib.util.spec_from_file_location(f"{recipe}_{name}", REPO / recipe / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there while it executes
    spec.loader.exec_module(module)
    return module
