"""``hearth status``: is the node's agent up, which model it serves, how to reach it."""

from __future__ import annotations

import argparse
import socket
from typing import Any

from .common import add_json_flag, load_config, print_json


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``status`` subcommand."""
    p = sub.add_parser("status", help="health, model and URL of the node's agent")
    p.add_argument("--url", help="a node's API URL (default: this machine's agent)")
    p.add_argument("--key", help="API key for a node that is not this machine (default: $HEARTH_API_KEY)")
    add_json_flag(p)
    p.set_defaults(func=run)


def lan_address() -> str | None:
    """This machine's address on its default route (no packet is sent: a UDP connect only picks a route)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.255.255.255", 9))
            addr: str = s.getsockname()[0]
        except OSError:
            return None
    return None if addr.startswith("127.") else addr


def run(args: argparse.Namespace) -> int:
    """Print the agent's health; exit 0 when ready, 3 while loading or broken."""
    from ..api.client import AgentClient, local_key, local_url

    cfg = load_config(args)
    url = args.url or local_url(cfg)
    client = AgentClient(url, key=args.key or (None if args.url else local_key(cfg)))
    _, health = client.get("/health", ok=(200, 503))
    _, models = client.get("/v1/models")
    ip = lan_address() if not args.url else None
    api_url = f"http://{ip}:{cfg.api.port}/v1" if ip else url + "/v1"
    ready = health.get("status") == "ready"
    if args.json:
        print_json({"url": api_url, "health": health, "models": [m["id"] for m in models.get("data", [])]})
        return 0 if ready else 3
    _print(health, models, api_url)
    return 0 if ready else 3


def _print(health: dict[str, Any], models: dict[str, Any], api_url: str) -> None:
    rows: list[tuple[str, str]] = [("status", str(health.get("status", "unknown"))), ("API", api_url)]
    local = health.get("models") or {}
    for name, info in local.items():
        line = str(info.get("state", "")) if isinstance(info, dict) else ""
        if isinstance(info, dict):
            if info.get("tokens_per_second"):
                line += f", {info['tokens_per_second']} tok/s"
            if info.get("queued") is not None and info.get("capacity"):
                line += f", {info['queued']}/{info['capacity']} busy"
            if info.get("offload"):
                line += f", {_offload_text(info['offload'])}"
            if info.get("restarts"):
                line += f", {info['restarts']} restarts"
        if isinstance(info, dict) and info.get("pool"):
            line += ", across " + " + ".join(info["pool"])
        rows.append(("model", f"{name} ({line.strip(', ')})" if line else name))
    served = [m["id"] for m in models.get("data", []) if m["id"] not in local]
    if served:
        rows.append(("household", ", ".join(served)))
    if health.get("peers"):
        rows.append(("peers", str(health["peers"])))
    rows += _pool_rows(health.get("pool"))
    for warning in health.get("warnings") or ():
        rows.append(("warning", str(warning)))
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key.ljust(width)}  {value}")


def _pool_rows(pool: Any) -> list[tuple[str, str]]:
    """'pool offer  3.1 GiB on CPU (rpc-server ready)' and one 'pooled' row per model run across the pool."""
    if not isinstance(pool, dict):
        return []
    rows = []
    devices = (pool.get("offer") or {}).get("devices") or []
    if devices:
        offered = ", ".join(f"{d['bytes'] / (1 << 30):.1f} GiB on {d['name']}" for d in devices)
        rows.append(("pool offer", f"{offered} (rpc-server {pool.get('rpc_server', 'off')})"))
    for name, pm in (pool.get("models") or {}).items():
        members = ", ".join(f"{m['name']} {m['layers']} layers{' + output' if m.get('output') else ''}"
                            for m in pm.get("members") or [])
        detail = members if pm.get("state") == "ready" else f"{pm.get('state')}: {pm.get('reason')}"
        rows.append(("pooled", f"{name} ({detail})"))
    return rows


def _offload_text(offload: Any) -> str:
    """'19/19 layers on Vulkan0 (AMD Radeon RX 6700 XT)' or 'CPU (haswell)': where llama.cpp put the model."""
    if not isinstance(offload, dict):
        return f"offload: {offload}"
    done, total = offload.get("layers_offloaded"), offload.get("layers_total")
    variant = offload.get("cpu_variant")
    if done:
        return f"{done}/{total} layers on {device_text(offload)}"
    return f"CPU ({variant})" if variant else "CPU"


def device_text(offload: dict[str, Any]) -> str:
    """The devices llama.cpp placed weights on, with their descriptions: 'Vulkan0 (llvmpipe ...)'."""
    used = offload.get("devices_used") or [d for d in str(offload.get("backend") or "").split(", ") if d]
    described = {d.get("name"): d.get("description") for d in offload.get("devices") or () if isinstance(d, dict)}
    names = [f"{u} ({described[u]})" if described.get(u) else str(u) for u in used]
    return ", ".join(names) or "GPU"
