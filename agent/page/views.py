"""What the household page shows, gathered from the parts that already know it: the router (models and
where they run), the mesh (peers, their load and last seen), the hardware report, the store and the
catalogue with the profile's choice, the household's join code. Nothing here changes anything."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import httpx

from ..errors import HearthError

log = logging.getLogger(__name__)

PEER_HARDWARE_SECONDS = 60.0
"""A peer's hardware is fetched from its /hearth/v1/hardware at most this often."""
_peer_hardware: dict[str, tuple[float, dict[str, Any] | None]] = {}


def node_name(runtime: Any) -> str:
    """This node's name as the household knows it."""
    mesh = getattr(runtime, "mesh", None)
    if mesh is not None and getattr(mesh, "name", None):
        return str(mesh.name)
    import socket

    return runtime.config.node.name or socket.gethostname()


def _names_by_node(runtime: Any) -> dict[str, str]:
    names = {"local": node_name(runtime)}
    mesh = getattr(runtime, "mesh", None)
    if mesh is not None:
        names[str(mesh.node)] = node_name(runtime)
        for p in mesh.peers_summary():
            names[str(p["node"])] = str(p["name"])
    return names


def chat_models(runtime: Any) -> list[dict[str, Any]]:
    """Every model the household serves, with the names of the nodes it runs on (this node first)."""
    names = _names_by_node(runtime)
    out = []
    for m in runtime.router.models():
        nodes = [names.get(n, n) for n in m.nodes]
        out.append({"name": m.name, "nodes": nodes, "local": "local" in m.nodes, "loaded": m.loaded,
                    "context_length": m.context_length, "pool": list(m.pool)})
    out.sort(key=lambda m: (not m["local"], m["name"]))
    return out


def hardware_summary(report: dict[str, Any] | None) -> dict[str, Any] | None:
    """The lines a person wants from a hardware report: CPU, memory, GPUs (with VRAM), NPUs."""
    if not report:
        return None
    cpu = report.get("cpu") or {}
    gpus = [{"name": g.get("name"), "vendor": g.get("vendor"), "vram": g.get("vram_total"),
             "integrated": bool(g.get("integrated")), "usable": bool(g.get("usable"))}
            for g in report.get("gpus") or ()]
    return {"cpu": cpu.get("model"), "cores": cpu.get("cores"), "threads": cpu.get("threads"),
            "memory": report.get("memory"), "memory_available": report.get("memory_available"),
            "gpus": gpus, "npus": [n.get("name") for n in report.get("npus") or ()],
            "cpu_variant": (report.get("llama_cpp") or {}).get("cpu_variant")}


async def own_hardware(runtime: Any) -> dict[str, Any] | None:
    """This node's report: the daemon's probe, else a fresh (cached) one."""
    report = getattr(runtime, "report", None)
    if report is not None:
        return report.to_dict()  # type: ignore[no-any-return]
    try:
        from ..hardware.api import current_report
    except ImportError:
        return None
    try:
        return (await current_report()).to_dict()
    except Exception as e:  # a probe failure is a missing line on the page, never a broken page
        log.warning("hardware probe for the page failed: %s", e)
        return None


def _api_url(mesh: Any, peer: dict[str, Any]) -> str:
    """The peer's API (where /hearth/v1/hardware is), not its channel: http://host:api_port."""
    state = getattr(mesh.peers.get(peer["node"]), "state", None) or {}
    host, port = peer["host"], int(state.get("api_port") or 8080)
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


async def _peer_report(client: httpx.AsyncClient, url: str) -> dict[str, Any] | None:
    now = time.monotonic()
    cached = _peer_hardware.get(url)
    if cached is not None and now - cached[0] < PEER_HARDWARE_SECONDS:
        return cached[1]
    try:
        resp = await client.get(url.rstrip("/") + "/hearth/v1/hardware")
        report = resp.json() if resp.status_code == 200 else None
    except (httpx.HTTPError, ValueError):
        report = None
    _peer_hardware[url] = (now, report)
    return report


def _local_models(runtime: Any) -> list[dict[str, Any]]:
    try:
        models = runtime.health().get("models") or {}
    except Exception:
        return []
    return [{"name": n, "state": m.get("state"), "queued": m.get("queued", 0), "capacity": m.get("capacity", 0),
             "tokens_per_second": m.get("tokens_per_second", 0.0), "offload": m.get("offload")}
            for n, m in models.items()]


def downloads(runtime: Any, pulls: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Downloads in progress: the agent's own background fetch and pulls started from the page."""
    out = []
    try:
        own = runtime.health().get("download")
    except Exception:
        own = None
    if own:
        out.append({"model": own.get("model"), "completed": own.get("bytes", 0), "total": own.get("total"),
                    "status": own.get("line") or own.get("state"), "state": own.get("state"), "by": "agent"})
    for name, p in pulls.items():
        if p.get("state") == "running" or time.time() - p.get("ended", 0) < 60:
            out.append({"model": name, **p, "by": "page"})
    # Anything else with a partial file in the store: `hearth models pull` in a shell, Ollama's /api/pull,
    # or an interrupted download that the same command resumes.
    try:
        from ..models.download import partials
        from ..models.store import Store

        store = Store.from_config(runtime.config)
        shown = {d["model"] for d in out} | {e.file for e in store.catalogue if e.name in {d["model"] for d in out}}
        for part in partials(store):
            if part["file"] not in shown:
                out.append({"model": part["file"], "completed": part["bytes"], "total": part["total"],
                            "status": "partly downloaded", "state": "partial", "by": "store"})
    except (HearthError, OSError) as e:
        log.debug("partial downloads unreadable: %s", e)
    return out


async def household(runtime: Any, pulls: dict[str, dict[str, Any]], host: str | None = None) -> dict[str, Any]:
    """Every node (this one first) with hardware, models, load, tokens/s and last seen; downloads; the join code.
    *host* is the address the browser reached this node by."""
    local = _local_models(runtime)
    me = {"name": node_name(runtime), "self": True, "host": host, "models": local,
          "queued": sum(m["queued"] for m in local), "capacity": sum(m["capacity"] for m in local),
          "tokens_per_second": round(sum(m["tokens_per_second"] or 0 for m in local), 1),
          "last_seen": time.time(), "alive": True, "hardware": hardware_summary(await own_hardware(runtime))}
    nodes = [me]
    mesh = getattr(runtime, "mesh", None)
    household_id = join_code = None
    if mesh is not None:
        me["node"] = mesh.node
        household_id = mesh.household.id
        from ..mesh import household as hh

        try:
            join_code = hh.code_for(mesh.household.secret)
        except HearthError:
            join_code = None
        peers = mesh.peers_summary()
        async with httpx.AsyncClient(timeout=2.0, trust_env=False) as client:
            reports = await asyncio.gather(*(_peer_report(client, _api_url(mesh, p)) for p in peers))
        for p, report in zip(peers, reports, strict=True):
            state = getattr(mesh.peers.get(p["node"]), "state", None) or {}
            models = [{"name": m.get("name"), "state": "ready" if m.get("loaded") else "loading",
                       "queued": m.get("queued", 0), "capacity": m.get("capacity", 0),
                       "tokens_per_second": m.get("tokens_per_second", 0.0)} for m in state.get("models") or ()]
            if not models:
                models = [{"name": n, "state": "ready"} for n in p.get("models") or ()]
            nodes.append({"name": p["name"], "node": p["node"], "self": False, "host": p["host"], "models": models,
                          "queued": p.get("queued", 0), "capacity": p.get("capacity", 0),
                          "tokens_per_second": round(sum(m.get("tokens_per_second") or 0 for m in models), 1),
                          "last_seen": p.get("last_seen"), "alive": p.get("alive", True),
                          "hardware": hardware_summary(report)})
    return {"nodes": nodes, "downloads": downloads(runtime, pulls), "household": household_id,
            "join_code": join_code}


def catalogue(runtime: Any, report: dict[str, Any] | None) -> dict[str, Any]:
    """The catalogue, each model with whether it is stored, loaded here, and whether it fits this node and why;
    plus the profile's own pick. Runs the same selection the agent starts with (blocking: call in a thread)."""
    from ..hardware.report import Report
    from ..models.store import Store
    from ..select import select

    config = runtime.config
    store = Store.from_config(config)
    stored = {m.file: m for m in store.list()}
    loaded = {m["name"] for m in _local_models(runtime)}
    hw = Report.from_dict(report) if report else None
    pick: dict[str, Any] | None = None
    if hw is not None:
        try:
            choice = select(hw, config.replace(**{"model.name": "auto"}))
            pick = {"model": choice.model.name, "reason": choice.reason} if choice else None
        except HearthError as e:
            pick = {"model": None, "reason": e.message}
    rows = []
    for entry in store.catalogue:
        fits, reason = None, "no hardware report yet"
        if hw is not None:
            try:
                choice = select(hw, config.replace(**{"model.name": entry.name}))
                fits, reason = (choice is not None), (choice.reason if choice else "")
            except HearthError as e:
                fits, reason = False, e.message
        rows.append({"name": entry.name, "display_name": entry.display_name, "size": entry.size_bytes,
                     "parameters_b": entry.parameters_b, "quantization": entry.quantization,
                     "licence": getattr(entry, "licence", ""), "stored": entry.file in stored,
                     "loaded": entry.name in loaded or entry.file in loaded, "fits": fits, "reason": reason})
    others = [{"name": m.name, "file": m.file, "size": m.size, "loaded": m.name in loaded}
              for m in stored.values() if not m.in_catalogue]
    return {"pick": pick, "models": rows, "other_stored": others}
