"""The household channel: one mutual-TLS 1.3 listener per node that carries every node-to-node byte.

A connection's ALPN says what it carries:

- ``http/1.1``: the mesh's HTTP requests (hello, state, generate and its streamed answer, embed, model
  info and model file copies), served by an ASGI app (the mesh router) through uvicorn's HTTP protocol;
- ``hearth-tunnel/1``: a byte tunnel to a loopback service this node exposes (``expose("rpc", port)``: its
  ``rpc-server``). The dialler sends one line, ``open NAME`` (or ``probe NAME``), the listener answers
  ``OK`` or ``NO reason`` and then relays bytes both ways.

``forward(node, service)`` is the other end of a tunnel: a loopback listener whose every connection is
relayed through a new channel connection to that peer's service, so ``llama-server --rpc 127.0.0.1:PORT``
reaches a peer's ``rpc-server``, which itself listens on loopback only. Every relay is a pair of asyncio
protocols writing into each other's transport (no copies beyond the kernel's and OpenSSL's, flow control
by pausing the faster side); TCP keepalive and TCP_USER_TIMEOUT make a dead peer close the local side
within seconds, so llama.cpp's RPC client sees EOF instead of hanging.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import time
from collections.abc import Callable
from typing import Any

from .household import Household
from .identity import Identity
from .tls import ChannelError, Credentials, peer_node_id

log = logging.getLogger(__name__)

ALPN_HTTP = "http/1.1"
ALPN_TUNNEL = "hearth-tunnel/1"
HANDSHAKE_TIMEOUT_S = 10.0
"""A connection that has not finished its TLS handshake (and a tunnel its first line) by then is cut."""
DEAD_PEER_S = 5
"""A peer that acknowledges nothing for this long (TCP_USER_TIMEOUT, keepalive) is taken for dead."""
_MAX_LINE = 256


class ChannelRefused(ChannelError):
    """The peer refused the connection: another household, a node that is not the one asked for, or no such service."""


class PeerUnknown(ChannelError):
    """No address is known for that node (it is not, or no longer, a peer)."""


class PeerUnreachable(ChannelError):
    """The peer's channel port cannot be reached."""


def _tune(sock: Any) -> None:
    """No Nagle delay (RPC is request/answer), and a dead peer noticed within DEAD_PEER_S."""
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 2)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, DEAD_PEER_S - 2)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, DEAD_PEER_S * 1000)


class _Pipe(asyncio.Protocol):
    """One side of a relay: what arrives here is written to the other side's transport."""

    def __init__(self, count: Callable[[int], None] | None = None,
                 on_made: Callable[[_Pipe], None] | None = None) -> None:
        self.transport: asyncio.Transport | None = None
        self.other: _Pipe | None = None
        self.count = count
        self.on_made = on_made
        self.early: list[bytes] = []
        self.closed = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        if self.on_made is not None:
            self.on_made(self)

    def data_received(self, data: bytes) -> None:
        if self.count is not None:
            self.count(len(data))
        if self.other is not None and self.other.transport is not None:
            self.other.transport.write(data)
        else:
            self.early.append(data)  # the other side is still being connected

    def eof_received(self) -> bool:
        self._close_other()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._close_other(abort=exc is not None)
        if not self.closed.done():
            self.closed.set_result(None)

    def _close_other(self, abort: bool = False) -> None:
        other = self.other
        if other is not None and other.transport is not None and not other.transport.is_closing():
            if abort and other.transport.get_write_buffer_size() == 0:
                other.transport.abort()
            else:
                other.transport.close()  # what is buffered still goes out, then FIN

    def pause_writing(self) -> None:
        if self.other is not None and self.other.transport is not None:
            self.other.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.other is not None and self.other.transport is not None:
            self.other.transport.resume_reading()

    def join(self, other: _Pipe) -> None:
        """Relay both ways between this side and *other*, starting with anything that arrived early."""
        self.other, other.other = other, self
        for side in (self, other):
            early, side.early = side.early, []
            for data in early:
                side.data_received(data)

    def close(self) -> None:
        """Cut this side now."""
        if self.transport is not None and not self.transport.is_closing():
            self.transport.abort()


class _LineReader(asyncio.Protocol):
    """Collects the first line of a tunnel connection (the request or the answer), keeping what follows."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = b""
        self.raw = b""
        """Everything received, first line included (an HTTP connection hands all of it to the app)."""
        self.line: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        self.raw += data
        if not self.line.done():
            head, sep, rest = self.buffer.partition(b"\n")
            if sep:
                self.buffer = rest
                self.line.set_result(head)
            elif len(self.buffer) > _MAX_LINE:
                self.line.set_exception(ChannelRefused("the first line of the tunnel is too long"))
        if self.line.done() and self.transport is not None:
            self.transport.pause_reading()

    def eof_received(self) -> bool:
        self.connection_lost(None)
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.line.done():
            why = f": {exc}" if exc else ""
            self.line.set_exception(ChannelRefused(f"the peer closed the channel connection{why}"))
            self.line.exception()  # whoever waits gets it; nobody waiting is no error


class Forward:
    """A loopback listener relaying each connection to one peer's exposed service (see Channel.forward)."""

    def __init__(self, channel: Channel, node: str, service: str) -> None:
        self.channel = channel
        self.node = node
        self.service = service
        self.address = ""
        """'127.0.0.1:PORT': what goes into ``llama-server --rpc``."""
        self.bytes_out = 0
        """Bytes relayed from local clients to the peer (for the benchmark)."""
        self.bytes_in = 0
        """Bytes relayed from the peer to local clients."""
        self._server: asyncio.AbstractServer | None = None
        self._pipes: set[_Pipe] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    def _sent(self, n: int) -> None:
        self.bytes_out += n

    def _received(self, n: int) -> None:
        self.bytes_in += n

    async def _start(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self._accept, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        self.address = f"127.0.0.1:{port}"

    def _accept(self) -> _Pipe:
        return _Pipe(self._sent, on_made=self._accepted)

    def _accepted(self, local: _Pipe) -> None:
        assert local.transport is not None
        local.transport.pause_reading()  # until the peer's end is open
        self._pipes.add(local)
        task = asyncio.ensure_future(self._connect(local))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _connect(self, local: _Pipe) -> None:
        assert local.transport is not None
        _tune(local.transport.get_extra_info("socket"))
        try:
            remote = await self.channel._open_tunnel(self.node, self.service, lambda: _Pipe(self._received))
        except (ChannelError, OSError) as e:
            log.warning("channel: forward %s of %s to %s failed: %s", local.transport.get_extra_info("peername"),
                        self.service, self.node, e)
            local.close()
            self._pipes.discard(local)
            return
        if local.transport.is_closing():
            remote.close()
            return
        self._pipes.add(remote)
        local.join(remote)
        local.transport.resume_reading()
        await asyncio.gather(local.closed, remote.closed)
        self._pipes.discard(local)
        self._pipes.discard(remote)

    async def aclose(self) -> None:
        """Stop listening and cut every connection through this forward."""
        if self._server is not None:
            self._server.close()
            self._server = None
        for task in list(self._tasks):
            task.cancel()
        for pipe in list(self._pipes):
            pipe.close()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._pipes.clear()
        self.channel._forwards.discard(self)


class Channel:
    """This node's end of the household channel: the TLS listener, exposed services, forwards, and dialling."""

    def __init__(self, identity: Identity, household: Household, host: str = "0.0.0.0", port: int = 8081,
                 app: Any = None) -> None:
        self.credentials = Credentials.issue(identity, household)
        self.node = identity.node_id
        self.host = host
        self.port = port
        self.app = app
        self._server_ctx = self.credentials.context(server=True, alpn=[ALPN_HTTP, ALPN_TUNNEL])
        self._tunnel_ctx = self.credentials.context(server=False, alpn=[ALPN_TUNNEL])
        self._services: dict[str, int] = {}
        self._peers: dict[str, tuple[str, int]] = {}
        self._server: asyncio.AbstractServer | None = None
        self._uv: tuple[Any, Any] | None = None
        self._tunnels: set[_Pipe] = set()
        self._forwards: set[Forward] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._refusals: dict[tuple[str, str], float] = {}

    # --- dialling ----------------------------------------------------------------------------------------

    def http_context(self) -> ssl.SSLContext:
        """A client context for the mesh's HTTP requests (httpx sets its own ALPN, http/1.1, on it)."""
        return self.credentials.context(server=False)

    def add_peer(self, node: str, host: str, port: int) -> None:
        """Where *node*'s channel listens (the mesh service calls this once a peer has proved itself)."""
        self._peers[node] = (host, port)

    def remove_peer(self, node: str) -> None:
        """Forget *node*'s address (it left or died); forwards to it fail from now on."""
        self._peers.pop(node, None)

    def peer_address(self, node: str) -> tuple[str, int]:
        """(host, port) of *node*'s channel; raises PeerUnknown."""
        try:
            return self._peers[node]
        except KeyError:
            raise PeerUnknown(f"node {node} is not a known peer", hint="'hearth peers' lists the household's nodes") from None

    async def _dial(self, node: str, factory: Callable[[], asyncio.Protocol]) -> tuple[asyncio.Transport, Any]:
        host, port = self.peer_address(node)
        loop = asyncio.get_running_loop()
        try:
            transport, proto = await asyncio.wait_for(
                loop.create_connection(factory, host, port, ssl=self._tunnel_ctx, server_hostname=host or None,
                                       ssl_handshake_timeout=HANDSHAKE_TIMEOUT_S), HANDSHAKE_TIMEOUT_S + 1)
        except ssl.SSLError as e:
            raise ChannelRefused(f"node {node} at {host}:{port} failed the household handshake: {e.reason or e}",
                                 hint="is it in this household?") from None
        except (OSError, TimeoutError) as e:
            raise PeerUnreachable(f"cannot reach node {node}'s channel at {host}:{port}: {e or 'timed out'}") from None
        got = peer_node_id(transport.get_extra_info("ssl_object"))
        if got != node:
            transport.abort()
            raise ChannelRefused(f"the node at {host}:{port} is {got or 'unknown'}, not {node}")
        _tune(transport.get_extra_info("socket"))
        return transport, proto  # type: ignore[return-value]

    async def _ask(self, node: str, verb: str, service: str) -> tuple[asyncio.Transport, _LineReader]:
        transport, reader = await self._dial(node, _LineReader)
        transport.write(f"{verb} {service}\n".encode())
        try:
            answer = await asyncio.wait_for(reader.line, HANDSHAKE_TIMEOUT_S)
        except TimeoutError:
            transport.abort()
            raise PeerUnreachable(f"node {node} did not answer on the channel") from None
        except ChannelRefused as e:
            transport.abort()
            raise ChannelRefused(f"node {node} refused the channel ({e.message})", hint="is it in this household?") from None
        if answer != b"OK":
            transport.abort()
            raise ChannelRefused(f"node {node} refused: {answer.decode(errors='replace').removeprefix('NO ')}")
        return transport, reader

    async def probe(self, node: str, service: str) -> None:
        """Check that *node* is reachable, proves itself and exposes *service*; raises a ChannelError otherwise."""
        transport, _ = await self._ask(node, "probe", service)
        transport.close()

    async def _open_tunnel(self, node: str, service: str, factory: Callable[[], _Pipe]) -> _Pipe:
        transport, reader = await self._ask(node, "open", service)
        pipe = factory()
        transport.set_protocol(pipe)
        pipe.connection_made(transport)
        if reader.buffer:
            pipe.early.append(reader.buffer)
        transport.resume_reading()
        return pipe

    async def forward(self, node: str, service: str) -> Forward:
        """A loopback listener relaying to *node*'s exposed *service*; raises PeerUnknown, PeerUnreachable or
        ChannelRefused when the peer cannot serve it now."""
        await self.probe(node, service)
        fwd = Forward(self, node, service)
        await fwd._start()
        self._forwards.add(fwd)
        log.info("channel: forwarding %s to %s's %s", fwd.address, node, service)
        return fwd

    # --- exposing ----------------------------------------------------------------------------------------

    def expose(self, service: str, port: int) -> None:
        """Offer the loopback TCP service on 127.0.0.1:*port* to household members as *service*."""
        if not service or any(c.isspace() for c in service) or len(service) > 64:
            raise ValueError(f"bad service name {service!r}")
        self._services[service] = port

    def withdraw(self, service: str) -> None:
        """Stop offering *service* (connections already open stay until they end)."""
        self._services.pop(service, None)

    # --- listening ---------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Listen on host:port for household members; raises ChannelError when the port is taken."""
        loop = asyncio.get_running_loop()
        if self.app is not None:
            import uvicorn
            from uvicorn.server import ServerState

            config = uvicorn.Config(self.app, log_config=None, access_log=False, lifespan="off", ws="none")
            config.load()
            self._uv = (config, ServerState())
        try:
            self._server = await loop.create_server(self._accept, self.host, self.port, reuse_address=True)
        except OSError as e:
            raise ChannelError(f"cannot listen on {self.host}:{self.port} for the mesh: {e.strerror or e}",
                               hint="another program uses the port; set mesh.port in hearth.yaml") from None
        if self.port == 0:
            self.port = self._server.sockets[0].getsockname()[1]
        log.info("channel: household members reach this node on %s:%d (mutual TLS 1.3)", self.host, self.port)

    def _accept(self) -> asyncio.Protocol:
        return _Accepted(self)

    def _refused(self, addr: str, why: str) -> None:
        # Every refusal is logged, but a stranger retrying every few seconds is a WARNING once a minute.
        now = time.monotonic()
        level = logging.WARNING if now - self._refusals.get((addr, why), -1e9) > 60 else logging.DEBUG
        if level == logging.WARNING:
            self._refusals[(addr, why)] = now
            if len(self._refusals) > 4096:
                self._refusals.clear()
        log.log(level, "mesh: refused a channel connection from %s: %s", addr, why)

    async def _serve(self, plain: asyncio.Transport) -> None:
        """Handshake, then hand the connection to the HTTP app or to a tunnel."""
        loop = asyncio.get_running_loop()
        peer = plain.get_extra_info("peername")
        addr = peer[0] if peer else "?"
        _tune(plain.get_extra_info("socket"))
        holder = _LineReader()
        try:
            tls = await loop.start_tls(plain, holder, self._server_ctx, server_side=True,
                                       ssl_handshake_timeout=HANDSHAKE_TIMEOUT_S)
        except (ssl.SSLError, OSError, TimeoutError, ConnectionError) as e:
            self._refused(addr, f"TLS handshake failed ({getattr(e, 'reason', None) or type(e).__name__})")
            plain.abort()
            return
        if tls is None:
            plain.abort()
            return
        holder.connection_made(tls)
        alpn = tls.get_extra_info("ssl_object").selected_alpn_protocol()
        if alpn == ALPN_HTTP and self._uv is not None:
            config, state = self._uv
            http = config.http_protocol_class(config=config, server_state=state, app_state={})
            tls.set_protocol(http)
            http.connection_made(tls)
            if holder.raw:
                http.data_received(holder.raw)
            tls.resume_reading()
            return
        if alpn != ALPN_TUNNEL:
            self._refused(addr, f"no such channel protocol ({alpn})")
            tls.abort()
            return
        await self._serve_tunnel(tls, holder, addr)

    async def _serve_tunnel(self, tls: asyncio.Transport, holder: _LineReader, addr: str) -> None:
        loop = asyncio.get_running_loop()
        try:
            line = (await asyncio.wait_for(holder.line, HANDSHAKE_TIMEOUT_S)).decode(errors="replace")
        except (ChannelRefused, TimeoutError):
            tls.abort()
            return
        verb, _, service = line.partition(" ")
        port = self._services.get(service)
        if verb not in ("open", "probe") or port is None:
            tls.write(f"NO no service {service!r} here\n".encode())
            tls.close()
            return
        if verb == "probe":
            tls.write(b"OK\n")
            tls.close()
            return
        remote = _Pipe()
        tls.set_protocol(remote)
        remote.connection_made(tls)
        if holder.buffer:
            remote.early.append(holder.buffer)
        try:
            _, local = await loop.create_connection(_Pipe, "127.0.0.1", port)
        except OSError as e:
            tls.write(f"NO {service} is not running ({e.strerror})\n".encode())
            tls.close()
            return
        _tune(local.transport.get_extra_info("socket") if local.transport else None)
        tls.write(b"OK\n")
        tls.resume_reading()
        self._tunnels.update((remote, local))
        log.debug("channel: %s opened %s", peer_node_id(tls.get_extra_info("ssl_object")), service)
        remote.join(local)
        await asyncio.gather(remote.closed, local.closed)
        self._tunnels.difference_update((remote, local))

    async def stop(self, timeout: float = 1.5) -> None:
        """Stop listening, cut tunnels and forwards, and let HTTP requests in flight finish within *timeout*."""
        if self._server is not None:
            self._server.close()
        for fwd in list(self._forwards):
            await fwd.aclose()
        for pipe in list(self._tunnels):
            pipe.close()
        if self._uv is not None:
            _, state = self._uv
            for conn in list(state.connections):
                conn.shutdown()
            deadline = time.monotonic() + timeout
            while state.tasks and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            for task in list(state.tasks):
                task.cancel()
            # A TLS close waits for the peer's close_notify (up to 30 s): nothing is left to say, so cut.
            for conn in list(state.connections):
                conn.transport.abort()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._server = None


class _Accepted(asyncio.Protocol):
    """A freshly accepted TCP connection: starts the TLS handshake and hands over (see Channel._serve)."""

    def __init__(self, channel: Channel) -> None:
        self.channel = channel

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.pause_reading()  # type: ignore[attr-defined]  # the ClientHello is start_tls's to read
        task = asyncio.ensure_future(self.channel._serve(transport))  # type: ignore[arg-type]
        self.channel._tasks.add(task)
        task.add_done_callback(self.channel._tasks.discard)

    def data_received(self, data: bytes) -> None:  # start_tls takes over before any data is read
        pass
