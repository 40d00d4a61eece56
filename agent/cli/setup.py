"""``hearth setup``: apply a config or a preset under a root directory (what the wizard does, headless)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from ..errors import ConfigError, UsageError
from .common import add_json_flag, print_json


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``setup`` subcommand."""
    p = sub.add_parser("setup", help="set the node up from a preset or config file (headless first boot)")
    ss = p.add_subparsers(dest="setup_command", metavar="ACTION")
    a = ss.add_parser("apply", help="validate FILE (settings and secrets) and apply it under --root")
    a.add_argument("--root", type=Path, default=Path("/"), help="root directory to write under (default /)")
    a.add_argument("--preset", type=Path, required=True, metavar="FILE", help="a hearth.yaml with secrets")
    a.add_argument("--model-file", type=Path, metavar="GGUF", help="import this GGUF into the store and serve it")
    a.add_argument("--scrub", action="store_true", help="remove the secrets from FILE once applied")
    add_json_flag(a)
    a.set_defaults(func=run_apply)
    pr = ss.add_parser("preset", help="find a preset on the stick (/boot, /efi, HEARTH-CFG) and apply it")
    pr.add_argument("--root", type=Path, default=Path("/"), help="root directory to search and write under")
    add_json_flag(pr)
    pr.set_defaults(func=run_preset)
    st = ss.add_parser("status", help="whether this node is set up, and where a preset would be read")
    st.add_argument("--root", type=Path, default=Path("/"))
    add_json_flag(st)
    st.set_defaults(func=run_status)
    pp = ss.add_parser("page-password", help="copy the admin password's hash for the household page's sign-in "
                                             "(run by hearth-page-password.path whenever /etc/shadow changes)")
    pp.add_argument("--root", type=Path, default=Path("/"))
    pp.set_defaults(func=run_page_password)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def _progress(step: str, result: str) -> None:
    if result != "running":
        print(f"  {step:<16} {result}", file=sys.stderr)


def run_apply(args: argparse.Namespace) -> int:
    """Apply a preset file under --root."""
    from ..setup import apply, preset

    if not args.preset.is_file():
        raise UsageError(f"{args.preset}: no such file", hint="give the path of a hearth.yaml")
    found = preset.read(args.preset)
    if found.config is None:
        raise ConfigError(found.error or "invalid preset", hint=found.hint)
    done = apply.apply(found.config, args.root, model_file=args.model_file, progress=None if args.json else _progress)
    scrubbed = preset.scrub(args.preset) if args.scrub and preset.has_secrets(args.preset) else []
    if args.json:
        print_json({"steps": dict(done), "scrubbed": scrubbed})
    else:
        print(f"applied under {args.root}" + (f"; removed {', '.join(scrubbed)} from {args.preset}" if scrubbed else ""))
    return 0


def run_preset(args: argparse.Namespace) -> int:
    """Apply the stick's preset if there is one; exit 0 (nothing to do or applied) or 2 (invalid)."""
    from ..setup import preset

    out = preset.run(args.root, progress=None if args.json else _progress)
    if args.json:
        print_json({"status": out.status, "path": str(out.preset.path) if out.preset else None,
                    "error": out.preset.error if out.preset else None, "scrubbed": out.scrubbed})
    elif out.status == "none":
        print("no preset found; the wizard will ask")
    elif out.status == "configured":
        print("already set up" + (f"; removed {', '.join(out.scrubbed)} from the preset" if out.scrubbed else ""))
    elif out.status == "invalid" and out.preset:
        raise ConfigError(out.preset.error or "invalid preset", hint="the wizard opens with what was good filled in")
    else:
        print(f"applied {out.preset.path if out.preset else ''}; removed from it: {', '.join(out.scrubbed) or 'nothing'}")
    return 2 if out.status == "invalid" else 0


def run_status(args: argparse.Namespace) -> int:
    """Print whether the node is configured and where a preset is."""
    from ..setup import apply, preset

    configured = apply.is_configured(None, args.root)
    found = preset.find(args.root)
    if args.json:
        print_json({"configured": configured, "preset": str(found) if found else None})
    else:
        print(f"configured: {'yes' if configured else 'no'}\npreset: {found or 'none'}")
    return 0


def run_page_password(args: argparse.Namespace) -> int:
    """Give the agent the admin password's current hash (after ``passwd admin``)."""
    from .. import config
    from ..setup import apply

    shadow = args.root / "etc/shadow"
    if not os.access(shadow, os.R_OK):
        raise UsageError(f"cannot read {shadow}", hint="run it as root (hearth-page-password.service does)")
    print(apply.page_password(args.root, config.load()))
    return 0
