"""The household channel on loopback: mutual TLS 1.3 on node keys, exposed services and forwards.

Real TLS, real sockets, one process. What a stranger on another machine sees is in tests/netns/test_channel.py.
"""

from __future__ import annotations

import asyncio
import socket
import ssl

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding
from fastapi import FastAPI

from hearth.mesh.channel import Channel, ChannelRefused, PeerUnknown, PeerUnreachable
from hearth.mesh.household import Household
from hearth.mesh.identity import Identity
from hearth.mesh.tls import ChannelError, Credentials, household_ca, node_id_of_certificate, peer_node_id

HOME = Household(b"h" * 32)
OTHER = Household(b"o" * 32)


def _identity() -> Identity:
    return Identity(Ed25519PrivateKey.generate())


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(1 << 16):
        writer.write(data)
        await writer.drain()
    writer.close()


async def _ended(reader: asyncio.StreamReader) -> bytes:
    """What is left to read within 5 s; a reset counts as the end (what the relay could not deliver is cut)."""
    try:
        return await asyncio.wait_for(reader.read(), 5)
    except ConnectionResetError:
        return b""


@pytest.fixture
async def pair():
    """Channel A (serves an HTTP app and exposes an echo service) and channel B, both of HOME, on loopback."""
    app = FastAPI()

    @app.get("/who")
    async def who() -> dict[str, str]:
        return {"ok": "yes"}

    echo = await asyncio.start_server(_echo, "127.0.0.1", 0)
    a = Channel(_identity(), HOME, "127.0.0.1", 0, app=app)
    b = Channel(_identity(), HOME, "127.0.0.1", 0)
    await a.start()
    await b.start()
    a.expose("echo", echo.sockets[0].getsockname()[1])
    b.add_peer(a.node, "127.0.0.1", a.port)
    try:
        yield a, b
    finally:
        await b.stop()
        await a.stop()
        echo.close()


def test_the_household_ca_is_the_same_on_every_member_and_differs_between_households():
    assert household_ca(HOME) == household_ca(Household(b"h" * 32))
    assert household_ca(HOME).public_key() != household_ca(OTHER).public_key()
    ident = _identity()
    creds = Credentials.issue(ident, HOME)
    assert node_id_of_certificate(creds.certificate.public_bytes(Encoding.DER)) == ident.node_id


def test_contexts_speak_tls_1_3_only_and_require_a_certificate():
    creds = Credentials.issue(_identity(), HOME)
    for server in (True, False):
        ctx = creds.context(server=server)
        assert ctx.minimum_version == ctx.maximum_version == ssl.TLSVersion.TLSv1_3
        assert ctx.verify_mode == ssl.CERT_REQUIRED


async def test_a_forward_relays_bytes_both_ways_and_counts_them(pair):
    a, b = pair
    fwd = await b.forward(a.node, "echo")
    host, port = fwd.address.split(":")
    assert host == "127.0.0.1"
    reader, writer = await asyncio.open_connection(host, int(port))
    payload = bytes(range(256)) * 4096  # 1 MiB, more than any one buffer
    writer.write(payload)
    await writer.drain()
    got = await asyncio.wait_for(reader.readexactly(len(payload)), 30)
    assert got == payload
    assert fwd.bytes_out == fwd.bytes_in == len(payload)
    writer.close()
    await fwd.aclose()
    with pytest.raises(OSError):
        await asyncio.open_connection(host, int(port))  # a closed forward listens no more


async def test_other_household_unknown_node_and_missing_service_are_refused(pair):
    a, b = pair
    stranger = Channel(_identity(), OTHER, "127.0.0.1", 0)
    stranger.add_peer(a.node, "127.0.0.1", a.port)
    with pytest.raises(ChannelRefused, match="household handshake"):
        await stranger.forward(a.node, "echo")
    with pytest.raises(PeerUnknown):
        await b.forward("0123456789abcdef", "echo")
    with pytest.raises(ChannelRefused, match="no service 'rpc'"):
        await b.forward(a.node, "rpc")
    # The right address but another node's id: the certificate's key is not the node asked for.
    b.add_peer("0123456789abcdef", "127.0.0.1", a.port)
    with pytest.raises(ChannelRefused, match=f"is {a.node}, not 0123456789abcdef"):
        await b.forward("0123456789abcdef", "echo")
    a.withdraw("echo")
    with pytest.raises(ChannelRefused, match="no service 'echo'"):
        await b.forward(a.node, "echo")


async def test_unreachable_peer_is_a_specific_error(pair, free_port):
    _, b = pair
    b.add_peer("00000000000000aa", "127.0.0.1", free_port)
    with pytest.raises(PeerUnreachable):
        await b.forward("00000000000000aa", "echo")


async def test_the_mesh_http_app_answers_household_members_only(pair, caplog):
    a, b = pair
    async with httpx.AsyncClient(verify=b.http_context()) as client:
        resp = await client.get(f"https://127.0.0.1:{a.port}/who")
        assert resp.json() == {"ok": "yes"}
        assert peer_node_id(resp.extensions["network_stream"].get_extra_info("ssl_object")) == a.node
    stranger = Channel(_identity(), OTHER, "127.0.0.1", 0)
    with pytest.raises(httpx.ConnectError):
        async with httpx.AsyncClient(verify=stranger.http_context()) as client:
            await client.get(f"https://127.0.0.1:{a.port}/who")
    # A client that trusts anything but shows no household certificate: the listener refuses it.
    loose = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    loose.check_hostname, loose.verify_mode = False, ssl.CERT_NONE
    with pytest.raises(httpx.HTTPError):
        async with httpx.AsyncClient(verify=loose) as client:
            await client.get(f"https://127.0.0.1:{a.port}/who", timeout=5)
    await asyncio.sleep(0.1)
    assert "refused a channel connection from 127.0.0.1" in caplog.text


async def test_plain_tcp_gets_nothing(pair):
    a, _ = pair
    reader, writer = await asyncio.open_connection("127.0.0.1", a.port)
    writer.write(b"GET /who HTTP/1.1\r\nHost: x\r\n\r\n")
    await writer.drain()
    try:  # not TLS: closed (a reset, as the request was never read), not a byte of an answer
        got = await asyncio.wait_for(reader.read(), 15)
    except ConnectionResetError:
        got = b""
    assert b"ok" not in got and b"HTTP" not in got
    writer.close()


async def test_a_peer_that_dies_mid_transfer_closes_the_local_side(pair):
    """The exposed service vanishes while bytes flow: the forward's local connection ends (EOF), no hang."""
    a, b = pair
    sink_conns: list[asyncio.StreamWriter] = []

    async def sink(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sink_conns.append(writer)
        while await reader.read(1 << 16):
            pass

    server = await asyncio.start_server(sink, "127.0.0.1", 0)
    a.expose("sink", server.sockets[0].getsockname()[1])
    fwd = await b.forward(a.node, "sink")
    host, port = fwd.address.split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(b"x" * (1 << 20))
    await writer.drain()
    while not sink_conns:
        await asyncio.sleep(0.01)
    await a.stop()  # the whole peer goes away, tunnels and all
    assert await _ended(reader) == b""
    writer.close()
    server.close()
    await fwd.aclose()


def test_listening_on_a_taken_port_is_a_clear_error():
    async def main() -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            s.listen()
            ch = Channel(_identity(), HOME, "127.0.0.1", s.getsockname()[1])
            with pytest.raises(ChannelError, match="cannot listen on 127.0.0.1") as err:
                await ch.start()
            assert "mesh.port" in (err.value.hint or "")

    asyncio.run(main())


async def test_closing_a_forward_cuts_its_open_connections(pair):
    a, b = pair
    fwd = await b.forward(a.node, "echo")
    host, port = fwd.address.split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(b"ping")
    await writer.drain()
    assert await asyncio.wait_for(reader.readexactly(4), 10) == b"ping"
    await fwd.aclose()
    assert await _ended(reader) == b""  # EOF (or reset) at once, not a hang
    writer.close()


async def test_a_client_that_hangs_up_ends_the_services_connection_too(pair):
    """llama.cpp's RPC server serves one client at a time: a forward's client closing must close the tunnel's
    loopback connection on the other side (close_notify through the relay), or the next client waits forever."""
    a, b = pair
    ended = asyncio.Event()
    got = bytearray()

    async def service(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(1 << 16):
            got.extend(data)
        ended.set()
        writer.close()

    server = await asyncio.start_server(service, "127.0.0.1", 0)
    a.expose("one", server.sockets[0].getsockname()[1])
    fwd = await b.forward(a.node, "one")
    host, port = fwd.address.split(":")
    for round_ in range(2):  # and the next client gets through as well
        ended.clear()
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(b"hello %d" % round_)
        await writer.drain()
        writer.close()
        await asyncio.wait_for(ended.wait(), 5)
        assert got.endswith(b"hello %d" % round_)
    server.close()
    await fwd.aclose()
