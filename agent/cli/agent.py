"""``hearth agent``: run the node daemon in the foreground (what hearth-agent.service starts)."""

from __future__ import annotations

import argparse

from .common import load_config


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``agent`` subcommand."""
    p = sub.add_parser("agent", help="run the node: model workers, household mesh and the API")
    p.add_argument("--port", type=int, help="API port (overrides api.port)")
    p.add_argument("--host", help="API address (overrides api.host)")
    p.add_argument("--model", help="model name, store file or GGUF path to serve (overrides model.name)")
    p.add_argument("--state-dir", metavar="DIR", help="state directory (overrides state.dir)")
    p.add_argument("--shutdown-timeout", type=float, default=10.0, metavar="S",
                   help="seconds to let streams finish on SIGTERM before stopping (default 10)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Start the daemon and block until SIGTERM/SIGINT."""
    from .. import daemon

    cfg = load_config(args)
    overrides = {"api.port": args.port, "api.host": args.host, "model.name": args.model,
                 "state.dir": args.state_dir}
    changed = {k: v for k, v in overrides.items() if v is not None}
    if changed:
        cfg = cfg.replace(**changed)
    return daemon.run(cfg, shutdown_timeout=args.shutdown_timeout)
