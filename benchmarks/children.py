"""Each benchmark variant runs in a fresh child process, so its peak memory, compiled kernels and
CUDA state are its own. The child is the benchmark itself, started with `--child <variant>`; it
prints each measured row as a `ROW {json}` line and the parent reads them back from its stdout."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

MARK = "ROW "


def print_row(row: dict) -> None:
    """In the child: hand one measured row to the parent."""
    print(MARK + json.dumps(row), flush=True)


def run_child(command: list[str], *, env: dict | None = None, log: Path | None = None,
              label: str = "") -> tuple[subprocess.CompletedProcess, list[dict], str]:
    """Run a child to the end: (the process, its rows, its error: "" when it exited 0 with a row,
    else the last line of its stderr; its output tails then go to our stderr)."""
    start = time.time()
    process = subprocess.run(command, capture_output=True, text=True, env=env)
    if log:
        with open(log, "a") as f:
            f.write(f"===== {label or ' '.join(command)}: exit {process.returncode}, {time.time() - start:.0f} s\n"
                    f"{process.stdout}\n{process.stderr}\n")
    rows = [json.loads(line[len(MARK):]) for line in process.stdout.splitlines() if line.startswith(MARK)]
    error = ""
    if process.returncode or not rows:
        print(process.stdout[-2000:], process.stderr[-4000:], file=sys.stderr)
        error = (process.stderr.strip().splitlines() or [f"exit {process.returncode}, no row"])[-1][:300]
    return process, rows, error


def child_row(script: str, variant: str, argv: list[str] | None = None, *, launcher: list[str] | None = None,
              env: dict | None = None, log: Path | None = None) -> dict:
    """`script --child variant` followed by this run's own arguments, in a fresh process: its last row, or
    `{"variant": variant, "error": ...}` when it failed."""
    argv = sys.argv[1:] if argv is None else argv
    command = [*(launcher or [sys.executable]), script, "--child", variant, *argv]
    _, rows, error = run_child(command, env=env, log=log, label=variant)
    return {"variant": variant, "error": error} if error else rows[-1]
