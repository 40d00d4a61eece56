"""``hearth update``: check for, apply and report A/B image updates (README, "Updates")."""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path
from typing import Any

from .common import add_json_flag, load_config, print_json


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``update`` subcommand."""
    p = sub.add_parser("update", help="check for, apply and report image updates (A/B, with rollback)")
    us = p.add_subparsers(dest="action", metavar="ACTION")
    for name, text in (("check", "say whether a newer signed release is available"),
                       ("apply", "download (once per household), verify and install the newest release")):
        a = us.add_parser(name, help=text)
        a.add_argument("--from", dest="source", metavar="URL",
                       help="release folder to use instead of peers and update.url (http(s)://, file:// or a path)")
        add_json_flag(a)
    s = us.add_parser("status", help="this node's version, boot entries and stored release")
    add_json_flag(s)
    p.set_defaults(func=run, action=None)


def _sources(cfg: Any, override: str | None) -> list[Any]:
    from ..update.fetch import Source

    if override:
        base = override if "://" in override else "file://" + str(Path(override).resolve())
        return [Source(base, override)]
    sources = _peer_sources(cfg) if cfg.update.from_peers else []
    if cfg.update.url:
        sources.append(Source(cfg.update.url, cfg.update.url))
    return sources


def _peer_sources(cfg: Any) -> list[Any]:
    """Household peers as sources, as this node's agent sees them (none when it is not running)."""
    import httpx

    from ..mesh import household, identity
    from ..mesh.auth import derive_key
    from ..mesh.client import signed_headers
    from ..update.fetch import Source

    hh = household.load(cfg.state.dir)
    if hh is None:
        return []
    try:
        resp = httpx.get(f"http://127.0.0.1:{cfg.api.port}/mesh/v1/peers", timeout=3.0, trust_env=False)
        peers = resp.json().get("peers", []) if resp.status_code == 200 else []
    except (httpx.HTTPError, ValueError, AttributeError):
        return []
    key, me = derive_key(hh.secret), identity.load_or_create(cfg.state.dir).node_id

    def sign(method: str, url: str) -> dict[str, str]:
        return signed_headers(key, me, method, url)

    return [Source(f"{p['url'].rstrip('/')}/mesh/v1/updates", f"peer {p.get('name') or p['url']}", sign)
            for p in peers if p.get("url")]


def _progress() -> Any:
    last: dict[str, int] = {}
    tty = sys.stderr.isatty()

    def show(name: str, done: int, total: int) -> None:
        pct = done * 100 // total if total else 0
        if tty:
            sys.stderr.write(f"\r{name}: {pct:3d}% ({done >> 20} of {total >> 20} MiB)")
            if done >= total:
                sys.stderr.write("\n")
        elif pct // 10 != last.get(name, -1) or done >= total:
            last[name] = pct // 10
            sys.stderr.write(f"{name}: {pct}% ({done >> 20} of {total >> 20} MiB)\n")
        sys.stderr.flush()

    return show


def run(args: argparse.Namespace) -> int:
    """Run one update action."""
    from ..errors import UsageError
    from ..update import boot

    cfg = load_config(args)
    if args.action == "status":
        return _status(cfg, args.json)
    if args.action not in ("check", "apply"):
        raise UsageError("say what to do: check, apply or status", hint="hearth update --help")
    from ..update import apply, fetch
    from ..update.sums import UpdateError

    sources = _sources(cfg, args.source)
    if not sources:
        raise UpdateError("nowhere to look for updates",
                          hint="set update.url in hearth.yaml ('hearth config set update.url URL') or pass --from URL")
    current = boot.image_version()
    if args.action == "apply":
        # Before downloading hundreds of MiB that a BIOS boot or an old single-root stick cannot install.
        boot.require_uefi()
        current = apply.require_ab_layout()
    if args.action == "check":
        work = fetch.store_dir(cfg.state.dir) / "probe"
        offers = []
        for s in sources:
            try:
                rel = fetch.newest(s, work, current)
            except UpdateError as e:
                print(f"{s.label}: {e.message}", file=sys.stderr)
                continue
            offers.append((s.label, rel))
        shutil.rmtree(work, ignore_errors=True)
        if not offers:
            raise UpdateError("no update source answered")
        newer = [(label, r) for label, r in offers if r is not None]
        if args.json:
            print_json({"current": current, "available": [{"source": label, "version": r.version} for label, r in newer]})
        elif newer:
            label, rel = max(newer, key=lambda lr: boot.version_key(lr[1].version))
            print(f"version {rel.version} is available from {label} (this node runs {current}); "
                  "'hearth update apply' installs it")
        else:
            print(f"up to date: this node runs {current}")
        return 0
    release = fetch.download(sources, cfg.state.dir, current, progress=_progress())
    if release is None:
        print(f"up to date: this node runs {current}")
        return 0
    verified = fetch.store_dir(cfg.state.dir) / "verified"
    apply.preflight(release, verified)
    print(f"installing version {release.version} (signature and SHA-256 checked)")
    apply.install(release, cfg.state.dir)
    fetch.write_note(cfg.state.dir, f"installed {release.version}; boots next, 3 tries to prove itself healthy\n")
    if args.json:
        print_json({"installed": release.version, "current": current})
    else:
        print(f"version {release.version} is installed: reboot to start it. If it is not healthy within "
              "3 tries it is marked bad and the node goes back to this version by itself.")
    return 0


def _status(cfg: Any, as_json: bool) -> int:
    from ..update import apply, boot, fetch

    uefi = boot.booted_uefi()
    current = boot.image_version()
    selected = boot.selected_entry()
    entries = boot.entries(apply.ESP) if apply.ESP.is_dir() else []
    stored = fetch.stored(cfg.state.dir)
    note_path = fetch.store_dir(cfg.state.dir) / "last"
    note = note_path.read_text().strip() if note_path.exists() else ""
    data = {
        "version": current, "firmware": "uefi" if uefi else "bios", "booted_entry": selected,
        "entries": [{"file": e.file, "version": e.version, "state": e.state, "tries_left": e.left} for e in entries],
        "stored_release": stored.version if stored else None, "last": note,
        "url": cfg.update.url, "can_update": uefi and current is not None,
    }
    if as_json:
        print_json(data)
        return 0
    print(f"version {current or 'unknown (image without A/B updates)'}, booted through {data['firmware'].upper()}"
          + (f" ({selected})" if selected else ""))
    for e in entries:
        left = f", {e.left} tries left" if e.state == "trying" else ""
        print(f"  {e.file}: {e.state}{left}")
    if stored:
        print(f"stored for the household: version {stored.version}")
    if note:
        print(f"last: {note}")
    if not uefi:
        print(f"updates: off ({boot.BIOS_REFUSAL}); {boot.BIOS_HINT}")
    elif current is None:
        print(f"updates: off; {apply.MIGRATION} ({apply.MIGRATION_HINT})")
    return 0
