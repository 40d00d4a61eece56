"""Helpers every subcommand shares: loading config, printing tables and JSON."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from collections.abc import Sequence
from typing import Any

from .. import config as config_mod


def load_config(args: argparse.Namespace) -> config_mod.Config:
    """The config named by --config, $HEARTH_CONFIG or the default path."""
    return config_mod.load(getattr(args, "config", None))


def print_json(obj: Any) -> None:
    """Print one JSON document (for --json)."""
    json.dump(obj, sys.stdout, indent=2, default=str)
    sys.stdout.write("\n")


def print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], max_width: int | None = None) -> None:
    """Print rows as an aligned plain-text table that fits the terminal (last column wraps by truncation)."""
    cells = [[str(c) for c in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    limit = max_width or shutil.get_terminal_size((100, 24)).columns
    fixed = sum(widths[:-1]) + 2 * (len(widths) - 1)
    if fixed + widths[-1] > limit and limit - fixed > 10:
        widths[-1] = limit - fixed
    for n, row in enumerate(cells):
        parts = [c.ljust(w) if i < len(row) - 1 else c[: widths[-1]] for i, (c, w) in enumerate(zip(row, widths, strict=True))]
        print("  ".join(parts).rstrip())
        if n == 0:
            print("  ".join("-" * w for w in widths))


def add_json_flag(parser: argparse.ArgumentParser) -> None:
    """Add the --json flag that scripts use."""
    parser.add_argument("--json", action="store_true", help="print JSON for scripts")
