"""Discovery, trust and model copy between real agents in network namespaces (no model loaded).

A, B and C find each other over real mDNS; D sits where multicast is off and knows only A; E has another
household's secret; a rogue process announces itself over mDNS claiming C's identity without proof.
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import textwrap
import time

import pytest
from meshlab import PYTHON, Agent, run_in, shape, wait_for

SECRET = bytes(range(32))


@pytest.fixture(scope="module")
def mesh(lan, tmp_path_factory, gemma_path):
    """Nodes A, B, C (mDNS), D (manual peer, no multicast) and E (wrong secret)."""
    base = tmp_path_factory.mktemp("mesh")
    ns = [lan.add() for _ in range(3)]
    ns_d = lan.add(multicast=False)
    ns_e = lan.add()
    nodes = {n: Agent(ns[i], f"hearth-{n.lower()}", base / n, SECRET) for i, n in enumerate("ABC")}
    nodes["C"].store = (gemma_path,)  # C has Gemma on disk (not loaded): B copies it
    nodes["D"] = Agent(ns_d, "hearth-d", base / "D", SECRET, peers=(ns[0].address,), discovery=False)
    nodes["E"] = Agent(ns_e, "hearth-e", base / "E", bytes(32))
    started = time.monotonic()
    try:
        for a in nodes.values():
            a.start()
        for a in nodes.values():
            a.wait_up(60)
        nodes["_started"] = started  # type: ignore[assignment]
        yield nodes
    finally:
        for a in nodes.values():
            if isinstance(a, Agent):
                a.stop()


def test_all_nodes_discover_each_other_and_the_manual_peer_joins(mesh):
    names = {"hearth-a", "hearth-b", "hearth-c", "hearth-d"}
    for n in "ABCD":
        others = names - {mesh[n].name}
        wait_for(lambda n=n, others=others: mesh[n].peer_names() == others, timeout=10)
    view = mesh["A"].view()
    by_name = {p["name"]: p for p in view["peers"]}
    assert by_name["hearth-b"]["source"] == "mdns"
    assert by_name["hearth-b"]["host"] == mesh["B"].ns.address
    assert by_name["hearth-d"]["host"] == mesh["D"].ns.address


def test_hearth_peers_lists_them_from_the_node_itself(mesh):
    a = mesh["A"]
    res = run_in(a.ns, PYTHON, "-m", "hearth", "--config", str(a.config_path), "peers")
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[0].split()[:6] == ["name", "ip", "models", "load", "pool", "last"]
    assert any(line.startswith("hearth-b ") and mesh["B"].ns.address in line for line in lines)
    res = run_in(a.ns, PYTHON, "-m", "hearth", "--config", str(a.config_path), "peers", "--json")
    assert {p["name"] for p in json.loads(res.stdout)["peers"]} == {"hearth-b", "hearth-c", "hearth-d"}


def test_wrong_household_is_refused_both_ways_and_never_routed_to(mesh):
    for n in "ABCD":
        assert "hearth-e" not in mesh[n].peer_names()
    assert mesh["E"].peer_names() == set()
    # E found A over mDNS and dialled its channel with another household's certificate: A refused the
    # handshake (no request was read) and logged who it was; E refused A's certificate too.
    wait_for(lambda: re.search(rf"WARNING .*refused a channel connection from {mesh['E'].ns.address}: TLS handshake",
                               mesh["A"].log_text()), timeout=10)
    assert re.search(rf"WARNING .*candidate https://{mesh['A'].ns.address}:\d+ refused: household handshake failed",
                     mesh["E"].log_text())


def test_unsigned_forged_and_replayed_requests_are_refused_and_logged(mesh):
    a = mesh["A"]
    assert a.signed("GET", "/mesh/v1/state", headers={}).status_code == 401
    forged = a.signed("GET", "/mesh/v1/state", key=bytes(32))
    assert forged.status_code == 403
    from hearth.mesh.client import signed_headers

    headers = signed_headers(a.key(), "tester", "GET", a.mesh_url + "/mesh/v1/state")
    assert a.signed("GET", "/mesh/v1/state", headers=headers).status_code == 200
    replay = a.signed("GET", "/mesh/v1/state", headers=headers)
    assert replay.status_code == 403 and "replayed" in replay.text
    # A signature for one path does not open another.
    body = json.dumps({"model": "x", "kind": "completion", "prompt": "hi"}).encode()
    moved = signed_headers(a.key(), "tester", "POST", a.mesh_url + "/mesh/v1/embed", body)
    assert a.signed("POST", "/mesh/v1/generate", body, headers=moved).status_code == 403
    log = a.log_text()
    for why in ("unsigned request", "bad signature", "replayed request"):
        assert re.search(rf"WARNING .*refused .* from {a.ns.address[:-1]}\d+: {why}", log), why


def test_the_api_port_carries_no_mesh_request(mesh):
    """Mesh requests (prompts, answers, state) travel only on the channel: on the API port, even a properly
    signed one finds nothing, and the node's own view is for loopback only."""
    import httpx

    from hearth.mesh.client import signed_headers

    a = mesh["A"]
    body = json.dumps({"model": "x", "kind": "completion", "prompt": "hi"}).encode()
    for method, path, content in (("POST", "/mesh/v1/generate", body), ("GET", "/mesh/v1/state", b""),
                                  ("POST", "/mesh/v1/hello", b"{}")):
        h = signed_headers(a.key(), "tester", method, a.url + path, content)
        resp = httpx.request(method, a.url + path, content=content, headers=h, trust_env=False, timeout=5)
        assert resp.status_code == 404, (path, resp.text)
    resp = httpx.get(a.url + "/mesh/v1/peers", trust_env=False, timeout=5)
    assert resp.status_code == 403 and "channel" in resp.text
    assert a.signed("GET", "/mesh/v1/peers").json()["node"] == a.view()["node"]  # on the channel: yes


def test_rogue_mdns_announcement_is_never_routed_to(mesh, lan):
    """A process announces _hearth._tcp with C's node id and key fingerprint and answers every HTTP request
    with 200: it has no secret and no key, so no node ever routes to it."""
    c = mesh["C"].view()
    rogue_ns = lan.add()
    script = textwrap.dedent(f"""
        import asyncio, socket
        from zeroconf import IPVersion
        from zeroconf.asyncio import AsyncZeroconf, AsyncServiceInfo
        from hearth.mesh import SERVICE_TYPE
        from hearth.mesh.discovery import txt_record
        async def answer(reader, writer):
            await reader.read(65536)
            writer.write(b'HTTP/1.1 200 OK\\r\\ncontent-type: application/json\\r\\ncontent-length: 2\\r\\n\\r\\n{{}}')
            await writer.drain(); writer.close()
        async def main():
            server = await asyncio.start_server(answer, "0.0.0.0", 8081)
            zc = AsyncZeroconf(ip_version=IPVersion.V4Only)
            info = AsyncServiceInfo(SERVICE_TYPE, "hearth-rogue." + SERVICE_TYPE, port=8080,
                properties=txt_record({c['node']!r}, 8080, "00" * 16, 8081), server="hearth-rogue.local.",
                addresses=[socket.inet_aton({rogue_ns.address!r})])
            await zc.async_register_service(info)
            print("announced", flush=True)
            await asyncio.sleep(8)
            await zc.async_close()
        asyncio.run(main())
    """)
    res = run_in(rogue_ns, PYTHON, "-c", script, timeout=60)
    assert "announced" in res.stdout, res.stderr
    for n in "ABD":
        view = mesh[n].view()
        assert all(p["host"] != rogue_ns.address for p in view["peers"])
        assert "hearth-rogue" not in {p["name"] for p in view["peers"]}
    assert re.search(rf"WARNING .*candidate https://{rogue_ns.address}:8081 refused: household handshake",
                     mesh["A"].log_text())


def test_a_killed_node_is_dropped_within_5_s_and_a_restarted_one_is_back_within_2_s(mesh):
    b = mesh["B"]
    b.kill()
    dropped = wait_for(lambda: all("hearth-b" not in mesh[n].peer_names() for n in "ACD"), timeout=6)
    assert dropped <= 5.0
    b.start()
    b.wait_up(60)
    up_at = time.monotonic()
    wait_for(lambda: all("hearth-b" in mesh[n].peer_names() for n in "AC"), timeout=10)
    assert time.monotonic() - up_at <= 2.0


def _sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def test_model_copied_from_a_peer_arrives_intact_after_one_interruption(mesh, gemma_path):
    """B copies Gemma from C with `hearth peers copy`; the first copy is killed midway, the second resumes."""
    b, c = mesh["B"], mesh["C"]
    wait_for(lambda: "hearth-c" in b.peer_names(), timeout=10)
    part = b.state / "models" / ".partial" / f"{gemma_path.name}.part"
    argv = ["ip", "netns", "exec", b.ns.name, PYTHON, "-m", "hearth", "--config", str(b.config_path), "peers",
            "copy", gemma_path.name]
    shape(c.ns, "400mbit")  # ~6 s for 253 MB, so there is a middle to interrupt
    try:
        first = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        wait_for(lambda: part.exists() and part.stat().st_size > 40 << 20, timeout=60)
        first.kill()
        first.wait(10)
        cut = part.stat().st_size
        assert 0 < cut < gemma_path.stat().st_size
    finally:
        shape(c.ns, None)
    second = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert second.returncode == 0, second.stdout + second.stderr
    assert f"resuming at {cut} of {gemma_path.stat().st_size} bytes" in second.stdout
    copied = b.state / "models" / gemma_path.name
    assert copied.is_file() and not copied.is_symlink()
    assert _sha256(copied) == _sha256(gemma_path)
    assert not part.exists()
    # B now offers the model to the household too.
    wait_for(lambda: any(gemma_path.name in (p.get("files") or []) for p in mesh["A"].view()["peers"]
                         if p["name"] == "hearth-b"), timeout=5)


def test_join_code_is_checked_live_against_a_peer(mesh, tmp_path):
    """The wizard's "joining checks the code live": right code yes, another household's no, a typo never leaves."""
    from hearth.mesh import household

    a = mesh["A"]
    good = household.code_for(SECRET)
    assert household.check_code_with_peer(good, a.ns.address) is True  # the mesh port is the default one
    assert household.check_code_with_peer(household.code_for(bytes(32)), a.ns.address) is False
    typo = good[:-1] + ("0" if good[-1] != "0" else "1")
    with pytest.raises(household.InvalidCode):
        household.check_code_with_peer(typo, "http://192.0.2.1:9")  # caught before any traffic
    joined = household.join_via_peer(tmp_path, good, a.mesh_url)
    assert joined.secret == SECRET
    with pytest.raises(household.HouseholdError, match="cannot reach"):
        household.check_code_with_peer(good, f"http://{a.ns.address}:9")
