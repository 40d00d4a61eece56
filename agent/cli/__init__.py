"""The ``hearth`` command: one module per subcommand under hearth.cli, each with ``register(subparsers)``.

Subcommand modules keep heavy imports (llama_cpp, fastapi, zeroconf) inside their handlers so that
``hearth --help`` and quick commands stay fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import traceback

from ..errors import HearthError

COMMANDS = [
    "config",
    "agent",
    "hardware",
    "setup",
    "household",
    "peers",
    "models",
    "status",
    "chat",
    "apikey",
    "update",
]
"""Subcommand modules in help order; a new subcommand adds its module name here."""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand registered."""
    parser = argparse.ArgumentParser(prog="hearth", description="Hearth: the household's private AI.")
    parser.add_argument("--config", metavar="PATH", help="config file (default: $HEARTH_CONFIG or /etc/hearth/hearth.yaml)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"{__name__}.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point: run a subcommand and turn expected failures into one line and an exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except HearthError as e:
        if args.debug:
            traceback.print_exc()
        print(f"hearth: error: {e.message}", file=sys.stderr)
        if e.hint:
            print(f"hint: {e.hint}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("hearth: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
