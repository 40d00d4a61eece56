"""The household pool, measured between real network namespaces (needs root and `ip`): every figure of
the README's "Pooling" section in one run, each measurement on its own namespaces on a Linux bridge (veth).

- channel_ratio: a bulk copy through the household channel (a forward in B, mutual TLS 1.3 across the
  veth, the exposed service on A's loopback) ÷ the same copy over plain TCP on the same link, by the
  same sender and receiver programs. Goal: ≥ 0.8.
- the split (bench/pool_split.py's main_netns): three real agents, A and B hold Gemma 3 270M under memory
  caps and C serves it over the channel; its greedy stream against one llama-server (identical_output),
  ms/token and TTFT split ÷ one node (pool_ms_per_token_ratio, ttft_ratio), the bytes the channel carries
  per generated token (bytes_per_token) and from them a projection on paper for a 32B model over 1 GbE,
  2.5 GbE and Wi-Fi; what forming the pool moves through the channel, and the same when A and B have the
  model in their own stores (load_mib_through_channel, ..._members_have_it).

Each prints its own lines; the last line is one JSON object with all their figures.

    sudo .venv/bin/python bench/pool.py [--copy-mib 256] [--rounds 3] [--tokens 64] [--threads 1]
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

import pool_split  # noqa: E402  (bench/, beside this file)
from meshlab import PYTHON, ChanPeer, Lan, Namespace, need_netns, run_in, shape  # noqa: E402

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


def main() -> int:
    """Run every measurement; the last line printed is their JSON."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--copy-mib", type=int, default=256, help="MiB per copy round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="each agent's and the reference's threads")
    parser.add_argument("--nice", type=int, default=0, help="rpc-servers' nice (the agent runs them at 10)")
    args = parser.parse_args()
    need_netns_or_exit()
    figures: dict[str, Any] = {}
    started = time.monotonic()
    lan = Lan()
    try:
        figures.update(channel_ratio(lan, args.copy_mib, args.rounds))
    finally:
        lan.close()
    split = pool_split.main_netns(args)
    pool_split.print_figures(split, sys.stdout)
    figures.update(split)
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
