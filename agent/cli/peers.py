"""``hearth peers``: the household's other nodes as this node's agent sees them; ``peers copy`` fetches a model."""

from __future__ import annotations

import argparse
import time
from typing import Any

from ..errors import HearthError
from .common import add_json_flag, load_config, print_json, print_table


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``peers`` subcommand."""
    p = sub.add_parser("peers", help="list the household's other nodes (name, IP, models, load, last seen)")
    p.add_argument("--url", help="the agent to ask (default: this node's, on loopback)")
    add_json_flag(p)
    ps = p.add_subparsers(dest="action", metavar="ACTION")
    c = ps.add_parser("copy", help="copy a model file from a peer into this node's store (resumable)")
    c.add_argument("name", help="the model file name, as 'hearth peers' lists it")
    c.add_argument("--from", dest="peer", metavar="URL", help="the peer to copy from (default: any that has it)")
    p.set_defaults(func=run, action=None)


def _mesh_view(url: str) -> dict[str, Any]:
    import httpx

    try:
        resp = httpx.get(url.rstrip("/") + "/mesh/v1/peers", timeout=5.0, trust_env=False)
    except httpx.HTTPError as e:
        raise HearthError(f"cannot reach the agent at {url}: {e}", hint="is hearth-agent running? (systemctl status hearth-agent)") from None
    if resp.status_code != 200:
        raise HearthError(f"the agent at {url} answered {resp.status_code}", hint="is the mesh enabled (mesh.enabled)?")
    return resp.json()


def run(args: argparse.Namespace) -> int:
    """List peers, or copy a model from one."""
    cfg = load_config(args)
    url = args.url or f"http://127.0.0.1:{cfg.api.port}"
    view = _mesh_view(url)
    if args.action == "copy":
        return _copy(args, cfg, view)
    if args.json:
        print_json(view)
        return 0
    rows = []
    now = time.time()
    for p in view["peers"]:
        seen = f"{now - p['last_seen']:.0f}s ago" if p.get("last_seen") else "never"
        load = f"{p.get('queued', 0)}/{p.get('capacity', 0)}"
        rows.append((p["name"], p["host"], _models_text(p), load, _pool_text(p.get("pool")), seen))
    if not rows:
        print(f"{view['name']} sees no peers (household {view['household']})")
        return 0
    print_table(("name", "ip", "models", "load", "pool", "last seen"), rows)
    return 0


def _models_text(peer: dict[str, Any]) -> str:
    """The peer's models; a pooled one with its members: 'qwen2.5-32b (pool: a + b)'."""
    pooled = (peer.get("pool") or {}).get("pooled") or {}
    names = [f"{m} (pool: {' + '.join(pooled[m])})" if m in pooled else m for m in peer.get("models") or []]
    return ", ".join(names) or "-"


def _pool_text(pool: Any) -> str:
    """What the peer offers the household pool: '3.1 GiB' (or '-')."""
    if not isinstance(pool, dict) or not pool.get("offered"):
        return "-"
    return f"{pool['offered'] / (1 << 30):.1f} GiB" + ("" if pool.get("ready") else " (starting)")


def _copy(args: argparse.Namespace, cfg: Any, view: dict[str, Any]) -> int:
    from ..mesh import household, identity
    from ..mesh.copy import copy_from_peer, peers_with_model
    from ..mesh.tls import Credentials
    from ..models.store import Store

    hh = household.load(cfg.state.dir)
    if hh is None:
        raise HearthError("this node has no household", hint="'hearth household join CODE'")
    me = identity.load_or_create(cfg.state.dir)
    peers = peers_with_model(view, args.name)
    if args.peer:
        peers = [p for p in view["peers"] if p["url"].rstrip("/") == args.peer.rstrip("/")]
    if not peers:
        raise HearthError(f"no peer has a model '{args.name}'", hint="'hearth peers --json' lists each peer's files")
    peer = peers[0]
    print(f"copying {args.name} from {peer['name']} ({peer['host']})", flush=True)
    model = copy_from_peer(Store.from_config(cfg), Credentials.issue(me, hh), peer["url"], peer["node"],
                           args.name, say=lambda line: print(line, flush=True))
    print(f"copied {model.file} to {model.path} (sha256 {model.sha256} checked)")
    return 0
