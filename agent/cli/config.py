"""``hearth config``: show the node's settings, list every setting, or check a file."""

from __future__ import annotations

import argparse

from .. import config as config_mod
from .common import add_json_flag, load_config, print_json, print_table


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``config`` subcommand."""
    p = sub.add_parser("config", help="show settings, list every setting, or check a config file")
    p.add_argument("--list", action="store_true", help="list every setting with its default and meaning")
    p.add_argument("--check", metavar="FILE", help="validate FILE and say what is wrong, if anything")
    add_json_flag(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Print the settings table (current values, defaults, or a check result)."""
    if args.check:
        config_mod.load(args.check) if _exists(args.check) else _missing(args.check)
        print(f"{args.check}: ok")
        return 0
    if args.list:
        rows = [(s.key, _shown(s.default), s.help) for s in config_mod.SETTINGS]
        if args.json:
            print_json([{"key": k, "default": d, "help": h} for k, d, h in rows])
        else:
            print_table(("setting", "default", "meaning"), rows)
        return 0
    cfg = load_config(args)
    if args.json:
        print_json(config_mod.to_dict(cfg))
    else:
        print_table(("setting", "value", "meaning"), config_mod.summary(cfg))
    return 0


def _shown(value: object) -> str:
    return "[]" if value == () else ('""' if value == "" else str(value))


def _exists(path: str) -> bool:
    import os

    return os.path.exists(path)


def _missing(path: str) -> None:
    from ..errors import ConfigError

    raise ConfigError(f"{path}: no such file", hint="give the path of a hearth.yaml")
