"""The household channel: one mutual-TLS 1.3 listener per node that carries every node-to-node byte.

A connection's ALPN says what it carries:

- ``http/1.1``: the mesh's HTTP requests (hello, state, generate and its streamed answer, embed, model
  info and model file copies), served by an ASGI app (the mesh router) through uvicorn's HTTP protocol
  on the event loop;
- ``hearth-tunnel/1``: a byte tunnel to a loopback service this node exposes (``expose("rpc", port)``: its
  ``rpc-server``). The dialler sends one line, ``open NAME`` (or ``probe NAME``), the listener answers
  ``OK`` or ``NO reason`` and then relays bytes both ways.

``forward(node, service)`` is the other end of a tunnel: a loopback listener whose every connection is
relayed through a new channel connection to that peer's service, so ``llama-server --rpc 127.0.0.1:PORT``
reaches a peer's ``rpc-server``, which itself listens on loopback only.

Tunnels are the pool's data path (a model's weights on load, activations every token), so they do not go
through asyncio's TLS transport, which measured at 0.14 of a plain TCP copy between two namespaces: each
tunnel is one thread driving OpenSSL through memory BIOs (``ssl.SSLObject``) between two non-blocking
sockets with 256 KiB reads. OpenSSL and the socket calls release the GIL, so the event loop keeps serving
while a tunnel moves data. The listener tells a tunnel from an HTTP connection by the ALPN in the
ClientHello (read with MSG_PEEK, before any TLS), and checks the negotiated ALPN again after the handshake.
TCP keepalive and TCP_USER_TIMEOUT make a dead peer close the local side within seconds, so llama.cpp's
RPC client sees EOF instead of hanging.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import select
import socket
import ssl
import threading
import time
from collections.abc import Callable
from typing import Any, cast

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
_CHUNK = 256 << 10
"""Bytes read from a socket at a time: large enough that Python's per-call cost is noise beside the copy."""
_HIGH_WATER = 1 << 20
"""A tunnel stops reading a side while this much is waiting to be written to the other (flow control)."""
_TUNNEL_HELLO = bytes([len(ALPN_TUNNEL)]) + ALPN_TUNNEL.encode()
"""How the tunnel's ALPN appears in a ClientHello's ALPN extension (length-prefixed)."""


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


class _Tls:
    """One end of a TLS connection driven by hand: a blocking socket during set-up, memory BIOs for OpenSSL."""

    def __init__(self, raw: socket.socket, ctx: ssl.SSLContext, server_side: bool) -> None:
        self.raw = raw
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.obj = ctx.wrap_bio(self.incoming, self.outgoing, server_side=server_side)
        self.plain = b""
        """Decrypted bytes read past the first line (they belong to the tunnel)."""

    def _flush(self) -> None:
        if self.outgoing.pending:
            self.raw.sendall(self.outgoing.read())

    def _fill(self) -> None:
        data = self.raw.recv(65536)
        if not data:
            raise ConnectionError("the peer closed the connection")
        self.incoming.write(data)

    def handshake(self) -> None:
        """The TLS handshake (raises ssl.SSLError, OSError, TimeoutError or ConnectionError)."""
        while True:
            try:
                self.obj.do_handshake()
                break
            except ssl.SSLWantReadError:
                self._flush()
                self._fill()
        self._flush()

    def send(self, data: bytes) -> None:
        """Encrypt and send *data* now (set-up messages)."""
        self.obj.write(data)
        self._flush()

    def line(self) -> bytes:
        """The first line of the tunnel (without its newline); what follows it is kept in self.plain."""
        while b"\n" not in self.plain:
            if len(self.plain) > _MAX_LINE:
                raise ChannelRefused("the first line of the tunnel is too long")
            try:
                data = self.obj.read(_MAX_LINE + 1)
            except ssl.SSLWantReadError:
                self._fill()
                continue
            except ssl.SSLZeroReturnError:
                data = b""
            if not data:  # close_notify
                raise ConnectionError("the peer closed the connection")
            self.plain += data
        head, _, self.plain = self.plain.partition(b"\n")
        return head

    def goodbye(self) -> None:
        """Send close_notify and close (a refusal or a probe's answer has been said)."""
        with contextlib.suppress(ssl.SSLError, OSError):
            self.obj.unwrap()
        with contextlib.suppress(OSError):
            self._flush()
        self.raw.close()


class _Relay:
    """A tunnel's data path: plaintext on a loopback socket, TLS on the peer's socket, one thread, both ways."""

    def __init__(self, tls: _Tls, plain: socket.socket, count_out: Callable[[int], None] | None = None,
                 count_in: Callable[[int], None] | None = None) -> None:
        self.tls = tls
        self.plain = plain
        self.count_out = count_out
        self.count_in = count_in
        self.closing = False
        self._decrypted = memoryview(b"")

    def close(self) -> None:
        """Cut both sides now (from any thread): the relay's thread sees it at once and ends."""
        self.closing = True
        for sock in (self.tls.raw, self.plain):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def run(self) -> None:
        """Relay until either side ends, then close both (what was already read still goes out)."""
        try:
            self._pump()
        except (OSError, ssl.SSLError, ValueError) as e:
            log.debug("channel: tunnel ended: %s", e)
        finally:
            for sock in (self.tls.raw, self.plain):
                with contextlib.suppress(OSError):
                    sock.close()

    def _pump(self) -> None:
        raw, plain, obj, tls = self.tls.raw, self.plain, self.tls.obj, self.tls
        raw.setblocking(False)
        plain.setblocking(False)
        view = memoryview(bytearray(_CHUNK))
        self._decrypted = memoryview(bytearray(_CHUNK))
        to_raw = bytearray()
        to_plain = bytearray()
        if tls.plain:
            if self.count_in is not None:
                self.count_in(len(tls.plain))
            _send_now(plain, to_plain, tls.plain)
        # What arrived with the first line may hold more records than that line: decrypt them now, as the
        # peer may send nothing more until they are answered.
        raw_done = self._drain(to_plain)
        plain_done = False
        rfd, pfd = raw.fileno(), plain.fileno()
        poll = select.poll()
        armed: set[int] = set()

        def arm(fd: int, mask: int) -> None:
            # A side that has ended and has nothing to write is left out: poll would report its hang-up forever.
            if mask:
                if fd in armed:
                    poll.modify(fd, mask)
                else:
                    poll.register(fd, mask)
                    armed.add(fd)
            elif fd in armed:
                poll.unregister(fd)
                armed.discard(fd)

        readable = select.POLLIN | select.POLLHUP | select.POLLERR
        while not self.closing and not ((raw_done or plain_done) and not to_raw and not to_plain):
            # Read a side only while the other has room (flow control); a side that ended is only written.
            arm(rfd, (select.POLLIN if not raw_done and len(to_plain) < _HIGH_WATER else 0)
                | (select.POLLOUT if to_raw else 0))
            arm(pfd, (select.POLLIN if not plain_done and len(to_raw) < _HIGH_WATER else 0)
                | (select.POLLOUT if to_plain else 0))
            for fd, ev in poll.poll(1000):
                if fd == rfd:
                    if ev & select.POLLOUT or (ev & select.POLLERR and to_raw):
                        del to_raw[:raw.send(to_raw)]  # an error raises here and ends the relay
                    if ev & readable and not raw_done:
                        n = raw.recv_into(view)
                        if not n:
                            raw_done = True
                        else:
                            tls.incoming.write(view[:n])
                            raw_done = self._drain(to_plain)
                            if tls.outgoing.pending:  # TLS 1.3 may answer while reading (a key update)
                                _send_now(raw, to_raw, tls.outgoing.read())
                else:
                    if ev & select.POLLOUT or (ev & select.POLLERR and to_plain):
                        del to_plain[:plain.send(to_plain)]
                    if ev & readable and not plain_done:
                        n = plain.recv_into(view)
                        if not n:
                            plain_done = True
                            with contextlib.suppress(ssl.SSLError):
                                obj.unwrap()  # close_notify: the peer learns the end was meant
                        else:
                            if self.count_out is not None:
                                self.count_out(n)
                            obj.write(view[:n])
                        _send_now(raw, to_raw, tls.outgoing.read())

    def _drain(self, to_plain: bytearray) -> bool:
        """Decrypt every whole record OpenSSL holds and pass it to the local side (what it cannot take now
        waits in *to_plain*); whether the peer sent its close_notify."""
        out = self._decrypted
        ended = False
        while not ended:
            filled = 0
            while filled < len(out):
                try:
                    n = cast(int, self.tls.obj.read(len(out) - filled, out[filled:]))  # with a buffer: a count
                except ssl.SSLWantReadError:
                    break
                except ssl.SSLZeroReturnError:
                    n = 0
                if not n:  # the peer's close_notify (OpenSSL may report it as a read of nothing)
                    ended = True
                    break
                filled += n
            if not filled:
                break
            if self.count_in is not None:
                self.count_in(filled)
            _send_now(self.plain, to_plain, out[:filled])
            if filled < len(out) and not ended:
                break
        return ended


def _send_now(sock: socket.socket, pending: bytearray, data: bytes | memoryview) -> None:
    """Send *data* after what is *pending*: straight away when nothing is, keeping what the socket cannot
    take yet at the end of *pending* (a copy: *data* may be a buffer that is about to be reused)."""
    if not pending:
        try:
            sent = sock.send(data)
        except BlockingIOError:
            sent = 0
        if sent == len(data):
            return
        data = memoryview(data)[sent:]
    pending += data


def _client_hello_alpn_tunnel(sock: socket.socket) -> bool | None:
    """Whether the TLS ClientHello waiting on *sock* (peeked, not read) offers the tunnel's ALPN; None while
    its first record has not fully arrived. Raises ChannelRefused for anything that is not TLS."""
    head = sock.recv(5, socket.MSG_PEEK)
    if not head:
        raise ChannelRefused("closed before its ClientHello")
    if head[0] != 0x16:  # a TLS handshake record
        raise ChannelRefused("not TLS")
    if len(head) < 5:
        return None
    size = 5 + int.from_bytes(head[3:5], "big")
    record = sock.recv(size, socket.MSG_PEEK)
    if len(record) < size:
        return None
    return _TUNNEL_HELLO in record


class Forward:
    """A loopback listener relaying each connection to one peer's exposed service (see Channel.forward)."""

    def __init__(self, channel: Channel, node: str, service: str) -> None:
        self.channel = channel
        self.node = node
        self.service = service
        self.address = ""
        """'127.0.0.1:PORT': what goes into ``llama-server --rpc``."""
        self._out = 0
        self._in = 0
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._accepting: asyncio.Task[None] | None = None
        self._relays: set[_Relay] = set()
        self._pending: set[socket.socket] = set()

    @property
    def bytes_out(self) -> int:
        """Bytes relayed from local clients to the peer (for the benchmark)."""
        return self._out

    @property
    def bytes_in(self) -> int:
        """Bytes relayed from the peer to local clients."""
        return self._in

    def _sent(self, n: int) -> None:
        with self._lock:
            self._out += n

    def _received(self, n: int) -> None:
        with self._lock:
            self._in += n

    async def _start(self) -> None:
        listener = socket.create_server(("127.0.0.1", 0))
        listener.setblocking(False)
        self._listener = listener
        self.address = f"127.0.0.1:{listener.getsockname()[1]}"
        self._accepting = asyncio.ensure_future(self._accept_loop(listener))

    async def _accept_loop(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                local, _ = await loop.sock_accept(listener)
            except OSError as e:
                log.warning("channel: forward %s stopped accepting: %s", self.address, e)
                return
            local.setblocking(True)
            self._pending.add(local)
            threading.Thread(target=self._relay, args=(local,), name=f"hearth-forward-{self.service}",
                             daemon=True).start()

    def _relay(self, local: socket.socket) -> None:
        _tune(local)
        try:
            tls = self.channel._ask(self.node, "open", self.service)
        except (ChannelError, OSError) as e:
            log.warning("channel: forward of %s to %s failed: %s", self.service, self.node, e)
            local.close()
            return
        finally:
            self._pending.discard(local)
        relay = _Relay(tls, local, self._sent, self._received)
        self._relays.add(relay)
        if self._listener is None:  # closed meanwhile
            relay.close()
        try:
            relay.run()
        finally:
            self._relays.discard(relay)

    async def aclose(self) -> None:
        """Stop listening and cut every connection through this forward."""
        if self._accepting is not None:
            self._accepting.cancel()
            await asyncio.gather(self._accepting, return_exceptions=True)
            self._accepting = None
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        for local in list(self._pending):
            with contextlib.suppress(OSError):
                local.shutdown(socket.SHUT_RDWR)
        for relay in list(self._relays):
            relay.close()
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
        self._http_ctx = self.credentials.context(server=True, alpn=[ALPN_HTTP])
        self._tunnel_server_ctx = self.credentials.context(server=True, alpn=[ALPN_TUNNEL])
        self._tunnel_ctx = self.credentials.context(server=False, alpn=[ALPN_TUNNEL])
        self._services: dict[str, int] = {}
        self._peers: dict[str, tuple[str, int]] = {}
        self._listener: socket.socket | None = None
        self._uv: tuple[Any, Any] | None = None
        self._tunnels: set[_Relay] = set()
        self._forwards: set[Forward] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._refusals: dict[tuple[str, str], float] = {}
        self._refusals_lock = threading.Lock()

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

    def _ask(self, node: str, verb: str, service: str) -> _Tls:
        """Dial *node*, prove both ends, and ask for *service* (blocking: a forward's thread, or to_thread).
        The connection, ready to relay; raises PeerUnknown, PeerUnreachable or ChannelRefused."""
        host, port = self.peer_address(node)
        try:
            raw = socket.create_connection((host, port), timeout=HANDSHAKE_TIMEOUT_S)
        except OSError as e:
            raise PeerUnreachable(f"cannot reach node {node}'s channel at {host}:{port}: {e.strerror or e}") from None
        _tune(raw)
        raw.settimeout(HANDSHAKE_TIMEOUT_S)
        tls = _Tls(raw, self._tunnel_ctx, server_side=False)
        try:
            try:
                tls.handshake()
            except ssl.SSLError as e:
                raise ChannelRefused(f"node {node} at {host}:{port} failed the household handshake: {e.reason or e}",
                                     hint="is it in this household?") from None
            except (OSError, TimeoutError) as e:  # ConnectionError included: the peer hung up on our certificate
                raise ChannelRefused(f"node {node} at {host}:{port} failed the household handshake: {e or 'timed out'}",
                                     hint="is it in this household?") from None
            got = peer_node_id(tls.obj)
            if got != node:
                raise ChannelRefused(f"the node at {host}:{port} is {got or 'unknown'}, not {node}")
            try:
                tls.send(f"{verb} {service}\n".encode())
                answer = tls.line()
            except ssl.SSLError as e:  # TLS 1.3: a refused client certificate shows up on the first read
                raise ChannelRefused(f"node {node} refused the channel ({e.reason or e})",
                                     hint="is it in this household?") from None
            except (OSError, TimeoutError) as e:
                raise PeerUnreachable(f"node {node} did not answer on the channel: {e or 'timed out'}") from None
            if answer != b"OK":
                raise ChannelRefused(f"node {node} refused: {answer.decode(errors='replace').removeprefix('NO ')}")
        except BaseException:
            raw.close()
            raise
        raw.settimeout(None)
        return tls

    async def probe(self, node: str, service: str) -> None:
        """Check that *node* is reachable, proves itself and exposes *service*; raises a ChannelError otherwise."""
        tls = await asyncio.to_thread(self._ask, node, "probe", service)
        tls.goodbye()

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
        if self.app is not None:
            import uvicorn
            from uvicorn.server import ServerState

            config = uvicorn.Config(self.app, log_config=None, access_log=False, lifespan="off", ws="none")
            config.load()
            self._uv = (config, ServerState())
        try:
            listener = socket.create_server((self.host, self.port), reuse_port=False)
        except OSError as e:
            raise ChannelError(f"cannot listen on {self.host}:{self.port} for the mesh: {e.strerror or e}",
                               hint="another program uses the port; set mesh.port in hearth.yaml") from None
        listener.setblocking(False)
        self._listener = listener
        if self.port == 0:
            self.port = listener.getsockname()[1]
        self._spawn(self._accept_loop(listener))
        log.info("channel: household members reach this node on %s:%d (mutual TLS 1.3)", self.host, self.port)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _accept_loop(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                sock, peer = await loop.sock_accept(listener)
            except OSError as e:
                if self._listener is None:
                    return
                log.warning("channel: accept failed: %s", e)
                await asyncio.sleep(0.1)
                continue
            self._spawn(self._serve(sock, peer[0] if peer else "?"))

    def _refused(self, addr: str, why: str) -> None:
        # Every refusal is logged, but a stranger retrying every few seconds is a WARNING once a minute.
        now = time.monotonic()
        with self._refusals_lock:
            level = logging.WARNING if now - self._refusals.get((addr, why), -1e9) > 60 else logging.DEBUG
            if level == logging.WARNING:
                self._refusals[(addr, why)] = now
                if len(self._refusals) > 4096:
                    self._refusals.clear()
        log.log(level, "mesh: refused a channel connection from %s: %s", addr, why)

    async def _hello(self, sock: socket.socket) -> bool:
        """Wait (without reading) for the ClientHello; whether it asks for a tunnel."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + HANDSHAKE_TIMEOUT_S
        while True:
            ready: asyncio.Future[None] = loop.create_future()
            loop.add_reader(sock.fileno(), _wake, ready)
            try:
                await asyncio.wait_for(ready, max(0.0, deadline - loop.time()))
            finally:
                loop.remove_reader(sock.fileno())
            tunnel = _client_hello_alpn_tunnel(sock)
            if tunnel is not None:
                return tunnel
            await asyncio.sleep(0.01)  # a ClientHello split across segments: the rest is on its way

    async def _serve(self, sock: socket.socket, addr: str) -> None:
        """Tell a tunnel from an HTTP connection by its ClientHello and hand it over."""
        _tune(sock)
        try:
            tunnel = await self._hello(sock)
        except (ChannelRefused, OSError, TimeoutError) as e:
            self._refused(addr, f"no TLS ClientHello ({getattr(e, 'message', None) or type(e).__name__})")
            sock.close()
            return
        if tunnel:
            sock.setblocking(True)
            threading.Thread(target=self._serve_tunnel, args=(sock, addr), name="hearth-tunnel", daemon=True).start()
        elif self._uv is None:
            self._refused(addr, "no mesh HTTP here")
            sock.close()
        else:
            await self._serve_http(sock, addr)

    async def _serve_http(self, sock: socket.socket, addr: str) -> None:
        loop = asyncio.get_running_loop()
        holder = _Holder()
        try:
            tls, _ = await loop.connect_accepted_socket(lambda: holder, sock, ssl=self._http_ctx,
                                                        ssl_handshake_timeout=HANDSHAKE_TIMEOUT_S)
        except (ssl.SSLError, OSError, TimeoutError, ConnectionError) as e:
            self._refused(addr, f"TLS handshake failed ({getattr(e, 'reason', None) or type(e).__name__})")
            sock.close()
            return
        if tls.get_extra_info("ssl_object").selected_alpn_protocol() != ALPN_HTTP:
            self._refused(addr, "no such channel protocol")
            tls.abort()
            return
        assert self._uv is not None
        config, state = self._uv
        http = config.http_protocol_class(config=config, server_state=state, app_state={})
        tls.set_protocol(http)
        http.connection_made(tls)
        if holder.data:
            http.data_received(b"".join(holder.data))
        tls.resume_reading()  # type: ignore[attr-defined]

    def _serve_tunnel(self, raw: socket.socket, addr: str) -> None:
        """A tunnel, in its own thread: handshake, the request line, then relay to the loopback service."""
        raw.settimeout(HANDSHAKE_TIMEOUT_S)
        tls = _Tls(raw, self._tunnel_server_ctx, server_side=True)
        try:
            tls.handshake()
            if tls.obj.selected_alpn_protocol() != ALPN_TUNNEL:
                raise ChannelRefused("no such channel protocol")
            line = tls.line().decode(errors="replace")
        except (ssl.SSLError, OSError, TimeoutError, ChannelRefused) as e:
            why = getattr(e, "message", None) or getattr(e, "reason", None) or type(e).__name__
            self._refused(addr, f"TLS handshake failed ({why})")
            raw.close()
            return
        verb, _, service = line.partition(" ")
        port = self._services.get(service)
        if verb not in ("open", "probe") or port is None:
            with contextlib.suppress(OSError, ssl.SSLError):
                tls.send(f"NO no service {service!r} here\n".encode())
            tls.goodbye()
            return
        if verb == "probe":
            with contextlib.suppress(OSError, ssl.SSLError):
                tls.send(b"OK\n")
            tls.goodbye()
            return
        try:
            local = socket.create_connection(("127.0.0.1", port), timeout=HANDSHAKE_TIMEOUT_S)
        except OSError as e:
            with contextlib.suppress(OSError, ssl.SSLError):
                tls.send(f"NO {service} is not running ({e.strerror})\n".encode())
            tls.goodbye()
            return
        _tune(local)
        try:
            tls.send(b"OK\n")
        except (OSError, ssl.SSLError):
            raw.close()
            local.close()
            return
        raw.settimeout(None)
        local.settimeout(None)
        relay = _Relay(tls, local)
        self._tunnels.add(relay)
        if self._listener is None:  # stopping
            relay.close()
        log.debug("channel: %s opened %s", peer_node_id(tls.obj), service)
        try:
            relay.run()
        finally:
            self._tunnels.discard(relay)

    async def stop(self, timeout: float = 1.5) -> None:
        """Stop listening, cut tunnels and forwards, and let HTTP requests in flight finish within *timeout*."""
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.close()
        for fwd in list(self._forwards):
            await fwd.aclose()
        for relay in list(self._tunnels):
            relay.close()
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


def _wake(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


class _Holder(asyncio.Protocol):
    """Holds an HTTP connection from its handshake until uvicorn's protocol takes it over."""

    def __init__(self) -> None:
        self.data: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.pause_reading()  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        self.data.append(data)
