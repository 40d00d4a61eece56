"""``hearth models``: list, import, pull and remove models in the node's store."""

from __future__ import annotations

import argparse
import sys
import time
from typing import TextIO

from .common import add_json_flag, load_config, print_json, print_table


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``models`` subcommand and its actions."""
    p = sub.add_parser("models", help="list, import, pull and remove models in the store")
    acts = p.add_subparsers(dest="action", metavar="ACTION")

    ls = acts.add_parser("list", help="models in the store (or the whole catalogue with --catalogue)")
    ls.add_argument("--catalogue", action="store_true", help="list the catalogue, marking what is stored")
    add_json_flag(ls)
    ls.set_defaults(func=run_list)

    imp = acts.add_parser("import", help="copy a GGUF file (a USB stick, say) into the store, verified")
    imp.add_argument("path", help="the .gguf file")
    imp.add_argument("--sha256", help="the file's expected sha256")
    imp.set_defaults(func=run_import)

    pull = acts.add_parser("pull", help="download a catalogue model or a .gguf URL (resumes an interrupted one)")
    pull.add_argument("model", metavar="NAME_OR_URL", help="catalogue name (gemma3-4b) or https URL of a .gguf")
    pull.add_argument("--sha256", help="the file's expected sha256 (for URLs)")
    pull.add_argument("--no-lan", action="store_true", help="do not try to copy it from a household peer first")
    pull.set_defaults(func=run_pull)

    rm = acts.add_parser("rm", help="remove a model (and any partial download of it)")
    rm.add_argument("model", metavar="NAME", help="catalogue name or file name")
    rm.set_defaults(func=run_rm)

    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def _store(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from ..models.store import Store

    return Store.from_config(load_config(args))


def run_list(args: argparse.Namespace) -> int:
    """Print the stored models (or the catalogue)."""
    from ..models.download import partials
    from ..models.store import human_bytes

    store = _store(args)
    stored = store.list()
    if args.catalogue:
        files = {m.file for m in stored}
        rows = [e.to_dict() | {"stored": e.file in files} for e in store.catalogue]
        if args.json:
            print_json(rows)
        else:
            print_table(("name", "params", "quant", "size", "ctx", "stored", "model"),
                        [(r["name"], f"{r['parameters_b']:g}B", r["quantization"], human_bytes(r["size_bytes"]),
                          r["context_length"], "yes" if r["stored"] else "", r["display_name"]) for r in rows])
        return 0
    if args.json:
        print_json([m.to_dict() for m in stored])
    elif stored:
        print_table(("name", "size", "sha256", "origin", "file"),
                    [(m.name, human_bytes(m.size), (m.sha256 or "-")[:12],
                      m.origin + ("" if m.in_catalogue else " (not in catalogue)"), m.file) for m in stored])
    else:
        print(f"no models in {store.root}; 'hearth models list --catalogue' shows what 'hearth models pull' can fetch")
    # on stderr, so that --json output stays one document
    for part in partials(store):
        total = f" of {human_bytes(part['total'])}" if part["total"] else ""
        print(f"interrupted download: {part['file']} ({human_bytes(part['bytes'])}{total}); "
              f"'hearth models pull' with the same name or URL resumes it", file=sys.stderr)
    return 0


def run_import(args: argparse.Namespace) -> int:
    """Copy a GGUF file into the store."""
    store = _store(args)
    with Progress(f"importing {args.path}") as bar:
        m = store.import_file(args.path, sha256=args.sha256, progress=bar)
    print(f"imported {m.name} ({m.file}, sha256 {m.sha256})")
    return 0


def run_pull(args: argparse.Namespace) -> int:
    """Download a model into the store, resuming an interrupted download."""
    from ..models.download import pull

    store = _store(args)
    entry = store.catalogue.get(args.model)
    already = store.find(entry.file if entry else args.model.rsplit("/", 1)[-1])
    if already and not args.sha256:
        print(f"{already.name} is already in the store: {already.path}")
        return 0
    if entry and not args.no_lan:
        lan = _pull_from_lan(args, entry.name)
        if lan is not None:
            print(f"{lan.name} is in the store: {lan.path} (copied from a household peer, sha256 {lan.sha256})")
            return 0
    with Progress(f"pulling {args.model}") as bar:
        m = pull(store, args.model, sha256=args.sha256, progress=bar)
    print(f"{m.name} is in the store: {m.path} (sha256 {m.sha256 or 'not recorded'})")
    return 0


def _pull_from_lan(args: argparse.Namespace, name: str):  # type: ignore[no-untyped-def]
    """Copy *name* from a household peer when one has it (faster than the internet); None otherwise."""
    from ..errors import HearthError

    try:
        from ..mesh.copy import pull_from_peers
    except ImportError:  # a node without the mesh parts
        return None
    try:
        with Progress(f"copying {name} from a peer") as bar:
            return pull_from_peers(load_config(args), name, progress=bar)
    except HearthError as e:
        print(f"copy from a peer failed ({e.message}); downloading instead", file=sys.stderr)
        return None


def run_rm(args: argparse.Namespace) -> int:
    """Remove a model from the store."""
    store = _store(args)
    for p in store.remove(args.model):
        print(f"removed {p}")
    return 0


class Progress:
    """A progress bar on a terminal; plain lines every few seconds otherwise (logs, pipes)."""

    def __init__(self, label: str, stream: TextIO | None = None, interval: float = 5.0) -> None:
        self.label = label
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.interval = interval if not self.tty else 0.1
        self.last = 0.0
        self.shown = self.finished = False

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.shown and self.tty:
            self.stream.write("\n")
            self.stream.flush()

    def __call__(self, done: int, total: int | None, rate: float) -> None:
        """Report *done* of *total* bytes at *rate* bytes/s (rate-limited output)."""
        from ..models.store import human_bytes

        now = time.monotonic()
        final = total is not None and done >= total
        if self.shown and now - self.last < self.interval and not final:
            return
        if final and self.finished:
            return
        self.last, self.shown, self.finished = now, True, final
        speed = f"{human_bytes(rate)}/s"
        if total:
            frac = min(done / total, 1.0)
            eta = f", {int((total - done) / rate)} s left" if rate > 0 and done < total else ""
            if self.tty:
                width = 30
                bar = "#" * int(frac * width)
                line = f"\r{self.label} [{bar:<{width}}] {frac:6.1%} {human_bytes(done)}/{human_bytes(total)} {speed}{eta} "
            else:
                line = f"{self.label}: {frac:.1%} ({human_bytes(done)} of {human_bytes(total)}, {speed}{eta})\n"
        else:
            start, end = ("\r", "") if self.tty else ("", "\n")
            line = f"{start}{self.label}: {human_bytes(done)} ({speed}){end}"
        self.stream.write(line)
        self.stream.flush()
