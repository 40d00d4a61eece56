"""One end of the household channel as a small program, for the namespace tests and bench/pool.py.

    python chanpeer.py --secret HEX --port 8091 [--expose NAME=PORT ...] [--sink NAME] [--echo NAME]
                       [--peer NODE=HOST:PORT] [--forward NODE/SERVICE ...]

--sink and --echo start a loopback service (it reads and counts; it echoes) and expose it. Prints one
JSON line when ready: {"node": ID, "port": PORT, "services": {NAME: LOOPBACK_PORT},
"forwards": {"NODE/SERVICE": "127.0.0.1:P"}}. Then reads commands on stdin: "stats" prints the bytes
relayed by its forwards and what its sink saw; end of input stops it. The channel is
hearth.mesh.channel.Channel, exactly as the agent runs it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from hearth.mesh.channel import Channel
from hearth.mesh.household import Household
from hearth.mesh.identity import Identity

SINK = {"connections": 0, "bytes": 0}


async def _sink(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    SINK["connections"] += 1
    while data := await reader.read(1 << 20):
        SINK["bytes"] += len(data)
    writer.close()


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(1 << 20):
        writer.write(data)
        await writer.drain()
    writer.close()


async def main(args: argparse.Namespace) -> None:
    """Run the channel until stdin closes."""
    channel = Channel(Identity(Ed25519PrivateKey.generate()), Household(bytes.fromhex(args.secret)),
                      host=args.host, port=args.port)
    await channel.start()
    services = {}
    for name, handler in [(n, _sink) for n in args.sink] + [(n, _echo) for n in args.echo]:
        server = await asyncio.start_server(handler, "127.0.0.1", 0)
        services[name] = server.sockets[0].getsockname()[1]
        channel.expose(name, services[name])
    for spec in args.expose:
        name, _, port = spec.partition("=")
        channel.expose(name, int(port))
    for spec in args.peer:
        node, _, addr = spec.partition("=")
        host, _, port = addr.rpartition(":")
        channel.add_peer(node, host, int(port))
    forwards = {}
    for spec in args.forward:
        node, _, service = spec.partition("/")
        forwards[spec] = await channel.forward(node, service)
    print(json.dumps({"node": channel.node, "port": channel.port, "services": services,
                      "forwards": {k: f.address for k, f in forwards.items()}}), flush=True)
    loop = asyncio.get_running_loop()
    while line := await loop.run_in_executor(None, sys.stdin.readline):
        if line.strip() == "stats":
            print(json.dumps({"bytes_out": sum(f.bytes_out for f in forwards.values()),
                              "bytes_in": sum(f.bytes_in for f in forwards.values()), "sink": SINK}), flush=True)
    await channel.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--secret", required=True)
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--port", type=int, default=8091)
    parser.add_argument("--expose", action="append", default=[])
    parser.add_argument("--sink", action="append", default=[])
    parser.add_argument("--echo", action="append", default=[])
    parser.add_argument("--peer", action="append", default=[])
    parser.add_argument("--forward", action="append", default=[])
    asyncio.run(main(parser.parse_args()))
