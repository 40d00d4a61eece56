"""The household channel between real network namespaces: who gets in, what a stranger sees, and the tunnel
carrying a real llama.cpp RPC session.

A runs a channel (tests/netns/chanpeer.py, hearth.mesh.channel.Channel as the agent runs it) exposing
loopback services; B is a member that forwards to them; strangers dial from B and C. Each side of every
refusal is checked: the stranger got nothing, and the exposed service saw no connection.
"""

from __future__ import annotations

import json
import os
import subprocess
import textwrap
import time
from pathlib import Path

import pytest
from meshlab import PYTHON, ROOT, ChanPeer, ChanPeerFailed, ip, run_in, wait_for

SECRET = bytes(range(2, 34))
OTHER = bytes(range(100, 132))


@pytest.fixture(scope="module")
def spaces(lan):
    """Namespaces A (serves), B (member), C (stranger)."""
    return lan.add(), lan.add(), lan.add()


@pytest.fixture
def served(spaces):
    """A's channel exposing a sink and an echo service on its loopback."""
    a = ChanPeer(spaces[0], SECRET, "--sink", "sink", "--echo", "echo")
    try:
        yield a
    finally:
        a.stop()


def _stream_script(address: str, stop_after: float) -> str:
    """A client that streams into *address* until it breaks (prints why and how long after 'streaming')."""
    host, port = address.split(":")
    return textwrap.dedent(f"""
        import socket, time
        s = socket.create_connection(({host!r}, {port}))
        block = b"x" * (1 << 16)
        for _ in range(16):
            s.sendall(block)
        print("streaming", flush=True)
        t0 = time.monotonic()
        try:
            s.settimeout(1.0)
            while time.monotonic() - t0 < {stop_after}:
                try:
                    s.sendall(block)
                except socket.timeout:
                    pass  # the far side is slow or silent: keep trying, the channel must end it
            print("hang", time.monotonic() - t0, flush=True)
        except OSError as e:
            print("closed", time.monotonic() - t0, type(e).__name__, flush=True)
    """)


def test_a_member_reaches_an_exposed_service_and_another_household_does_not(spaces, served):
    a, b, c = spaces
    member = ChanPeer(b, SECRET, "--peer", served.address, "--forward", f"{served.node}/echo")
    try:
        host, port = member.forward(f"{served.node}/echo").split(":")
        res = run_in(b, PYTHON, "-c", f"import socket; s = socket.create_connection(({host!r}, {port})); "
                     "s.sendall(b'through the channel'); print(s.recv(100).decode())", timeout=30)
        assert res.stdout.strip() == "through the channel", res.stderr
    finally:
        member.stop()
    with pytest.raises(ChanPeerFailed, match="household handshake"):
        ChanPeer(c, OTHER, "--peer", served.address, "--forward", f"{served.node}/sink")
    assert served.stats()["sink"]["connections"] == 0


def test_plain_forged_and_replayed_clients_get_nothing(spaces, served):
    """From C: a plain TCP client, a client with a self-made CA named like the household's, and a byte-exact
    replay of a member's whole session. None reaches the sink; the genuine session does."""
    a, _, c = spaces
    script = textwrap.dedent(f"""
        import json, socket, ssl, sys
        sys.path.insert(0, {str(ROOT / "tests" / "netns")!r})
        from cryptography import x509
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
        from hearth.mesh.household import Household
        from hearth.mesh.identity import Identity
        from hearth.mesh.tls import Credentials, _ca_name
        from meshlab import member_context
        HOST, PORT = {a.address!r}, {served.port}
        out = {{}}

        def read_all(sock, limit=5.0):
            sock.settimeout(limit)
            got = b""
            try:
                while chunk := sock.recv(65536):
                    got += chunk
            except OSError:
                pass
            return got

        # 1. Plain TCP: the tunnel's request line and an HTTP request, no TLS.
        s = socket.create_connection((HOST, PORT))
        s.sendall(b"open sink\\nGET /mesh/v1/state HTTP/1.1\\r\\nHost: a\\r\\n\\r\\n")
        out["plain"] = read_all(s).decode("latin1")

        # 2. Forged: a CA with the household CA's very name, but not its key.
        home = Household(bytes.fromhex({SECRET.hex()!r}))
        fake_ca = Ed25519PrivateKey.generate()
        me = Identity(Ed25519PrivateKey.generate())
        real = Credentials.issue(me, home)
        forged_cert = (x509.CertificateBuilder().subject_name(real.certificate.subject).issuer_name(_ca_name(home))
                       .public_key(me.private_key.public_key()).serial_number(1)
                       .not_valid_before(real.certificate.not_valid_before_utc)
                       .not_valid_after(real.certificate.not_valid_after_utc).sign(fake_ca, None))
        forged = Credentials(me, home, forged_cert, real.ca).context(server=False, alpn=["hearth-tunnel/1"])
        try:
            t = forged.wrap_socket(socket.create_connection((HOST, PORT)))
            t.sendall(b"open sink\\nforged bytes")
            out["forged"] = t.recv(100).decode("latin1")
        except (ssl.SSLError, OSError) as e:
            out["forged"] = "refused: " + type(e).__name__

        # 3. A member's genuine session, recorded byte for byte on the wire, then replayed.
        ctx = member_context(home.secret)
        ctx.set_alpn_protocols(["hearth-tunnel/1"])
        sock = socket.create_connection((HOST, PORT))
        inc, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        tls = ctx.wrap_bio(inc, outgoing)
        sent = []

        def flush():
            data = outgoing.read()
            if data:
                sent.append(data)
                sock.sendall(data)

        def pump(op):
            while True:
                try:
                    return op()
                except ssl.SSLWantReadError:
                    flush()
                    inc.write(sock.recv(65536))

        pump(tls.do_handshake)
        flush()
        tls.write(b"open sink\\n")
        flush()
        out["genuine"] = pump(lambda: tls.read(3)).decode()
        tls.write(b"genuine bytes")
        flush()
        sock.close()
        replay = socket.create_connection((HOST, PORT))
        replay.sendall(b"".join(sent))
        out["replay"] = read_all(replay).hex()
        print(json.dumps(out))
    """)
    res = run_in(c, PYTHON, "-c", script, timeout=90)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert "OK" not in out["plain"] and "HTTP/1.1 200" not in out["plain"] and '"node"' not in out["plain"]
    assert not out["forged"] or out["forged"].startswith("refused"), out["forged"]
    assert out["genuine"] == "OK\n"
    # The replay got the server's handshake (fresh keys) and then nothing it could use: no plaintext answer.
    assert b"OK\n" not in bytes.fromhex(out["replay"])
    sink = served.stats()["sink"]
    assert sink == {"connections": 1, "bytes": len("genuine bytes")}, sink  # only the genuine session got in


def test_a_peer_killed_mid_transfer_closes_the_local_side(spaces):
    a, b, _ = spaces
    server = ChanPeer(a, SECRET, "--sink", "sink")
    member = ChanPeer(b, SECRET, "--peer", server.address, "--forward", f"{server.node}/sink")
    try:
        proc = subprocess.Popen(["ip", "netns", "exec", b.name, PYTHON, "-c",
                                 _stream_script(member.forward(f"{server.node}/sink"), 60)],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "streaming"
        server.kill()
        out, _ = proc.communicate(timeout=30)
        verdict, seconds, *_ = out.split()
        assert verdict == "closed" and float(seconds) < 5.0, out
    finally:
        member.stop()
        server.kill()


def test_a_peer_whose_network_vanishes_mid_transfer_closes_the_local_side(spaces):
    """No FIN, no RST: A's link goes down. TCP_USER_TIMEOUT and keepalive end the relay within seconds."""
    a, b, _ = spaces
    server = ChanPeer(a, SECRET, "--sink", "sink")
    member = ChanPeer(b, SECRET, "--peer", server.address, "--forward", f"{server.node}/sink")
    try:
        proc = subprocess.Popen(["ip", "netns", "exec", b.name, PYTHON, "-c",
                                 _stream_script(member.forward(f"{server.node}/sink"), 60)],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "streaming"
        ip("-n", a.name, "link", "set", "eth0", "down")
        out, _ = proc.communicate(timeout=60)
        verdict, seconds, *_ = out.split()
        assert verdict == "closed" and float(seconds) < 15.0, out
    finally:
        ip("-n", a.name, "link", "set", "eth0", "up")
        member.stop()
        server.kill()


def _runtime_bin(name: str) -> Path:
    from hearth import llamacpp

    try:
        return llamacpp.server_binary(name)
    except llamacpp.RuntimeMissing as e:
        pytest.skip(e.message)


def _llama_env() -> dict[str, str]:
    from hearth import llamacpp

    return dict(os.environ, LD_LIBRARY_PATH=str(llamacpp.lib_dir()))


def _complete(ns, port: int, prompt: str, tokens: int) -> str:
    code = (f"import httpx, json; r = httpx.post('http://127.0.0.1:{port}/completion', json={{'prompt': {prompt!r}, "
            f"'n_predict': {tokens}, 'temperature': 0, 'top_k': 1, 'seed': 1, 'cache_prompt': False}}, timeout=300); "
            "print(json.dumps(r.json()['content']))")
    res = run_in(ns, PYTHON, "-c", code, timeout=320)
    assert res.returncode == 0, res.stderr[-2000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def _llama_server(ns, model: Path, port: int, *extra: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(["ip", "netns", "exec", ns.name, str(_runtime_bin("llama-server")), "-m", str(model),
                             "--host", "127.0.0.1", "--port", str(port), "-t", "1", "-c", "512", "-np", "1",
                             "--no-warmup", *extra], env=_llama_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _wait_health(ns, port: int, proc: subprocess.Popen[bytes], timeout: float = 240) -> None:
    code = f"import httpx; print(httpx.get('http://127.0.0.1:{port}/health', timeout=2).status_code)"

    def up() -> bool:
        if proc.poll() is not None:
            err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
            raise AssertionError(f"llama-server exited {proc.returncode}: {err[-3000:]}")
        return run_in(ns, PYTHON, "-c", code, timeout=10).stdout.strip() == "200"

    wait_for(up, timeout=timeout, interval=1.0)


def test_the_tunnel_carries_a_real_llama_rpc_session(spaces, gemma_path):
    """rpc-server on A's loopback only, exposed through A's channel; llama-server in B puts every layer on it
    through a forward. Greedy output equals B's own CPU run, and A's rpc-server port refuses B directly."""
    a, b, _ = spaces
    rpc_port, srv_port = 50652, 18181
    rpc = subprocess.Popen(["ip", "netns", "exec", a.name, str(_runtime_bin("rpc-server")), "-H", "127.0.0.1",
                            "-p", str(rpc_port), "-d", "CPU", "-t", "1"], env=_llama_env(),
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    server = member = pooled = local = None
    try:
        wait_for(lambda: run_in(a, PYTHON, "-c", f"import socket; socket.create_connection(('127.0.0.1', {rpc_port})"
                                ").close()", timeout=10).returncode == 0, timeout=30, interval=0.3)
        # The rpc-server port is loopback only: from B it refuses, on A's LAN address as on any other.
        direct = run_in(b, PYTHON, "-c", f"import socket; socket.create_connection(({a.address!r}, {rpc_port}), "
                        "timeout=5)", timeout=20)
        assert "ConnectionRefusedError" in direct.stderr, direct.stderr
        server = ChanPeer(a, SECRET, "--expose", f"rpc={rpc_port}")
        member = ChanPeer(b, SECRET, "--peer", server.address, "--forward", f"{server.node}/rpc")
        forward = member.forward(f"{server.node}/rpc")
        prompt = "The lighthouse keeper climbed the stairs and"
        pooled = _llama_server(b, gemma_path, srv_port, "--rpc", forward, "--device", "RPC0", "-ngl", "99",
                               "--fit", "off")
        _wait_health(b, srv_port, pooled)
        through_rpc = _complete(b, srv_port, prompt, 16)
        moved = member.stats()
        pooled.terminate()
        pooled.wait(30)
        local = _llama_server(b, gemma_path, srv_port, "-ngl", "0", "--fit", "off")
        _wait_health(b, srv_port, local)
        assert _complete(b, srv_port, prompt, 16) == through_rpc
        assert len(through_rpc) > 10
        # The weights went to A through the tunnel: at least most of the model's bytes.
        assert moved["bytes_out"] > gemma_path.stat().st_size * 0.5, moved
    finally:
        for p in (pooled, local):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait(10)
        for cp in (member, server):
            if cp is not None:
                cp.stop()
        rpc.kill()
        rpc.wait(10)


def test_no_process_in_a_members_namespace_listens_beyond_loopback_except_the_channel(spaces, served):
    """What A listens on from the LAN: only the channel port; the exposed services are loopback-bound."""
    a = spaces[0]
    res = subprocess.run(["ip", "netns", "exec", a.name, "ss", "-Hltn"], capture_output=True, text=True, cwd=ROOT)
    listening = {line.split()[3] for line in res.stdout.splitlines() if line.strip()}
    exposed = {f"127.0.0.1:{port}" for port in served.ready["services"].values()}
    assert exposed <= listening, (exposed, listening)
    assert {addr for addr in listening if not addr.startswith("127.")} == {f"0.0.0.0:{served.port}"}, listening
    started = time.monotonic()
    for port in served.ready["services"].values():
        res = run_in(spaces[2], PYTHON, "-c", f"import socket; socket.create_connection(({a.address!r}, {port}), "
                     "timeout=5)", timeout=20)
        assert "ConnectionRefusedError" in res.stderr, res.stderr
    assert time.monotonic() - started < 30
