"""Addresses that mislead discovery, as two VMs behind qemu's user network see them.

Both nodes carry the same 10.0.2.15 on an interface that leads nowhere, and their LAN interface gets its
address only after the agent has started (an IPv4 link-local claim on a LAN without DHCP, a late lease).
Each node must still find the other on the LAN address: never the shared one (that leads back to itself),
and without a restart.
"""

from __future__ import annotations

import secrets

import pytest
from meshlab import Agent, ip, wait_for

SECRET = bytes(range(1, 33))


@pytest.fixture(scope="module")
def pair(lan, tmp_path_factory):
    base = tmp_path_factory.mktemp("addr")
    third = secrets.randbelow(250) + 1
    ip("addr", "add", f"169.254.{third}.254/16", "dev", lan.bridge)  # the test's own way in
    spaces = [lan.add(address=f"169.254.{third}.{i}/16", now=False) for i in (1, 2)]
    for ns in spaces:
        lan.add_dummy(ns, "10.0.2.15/24")
    nodes = [Agent(ns, f"hearth-ll{i}", base / f"n{i}", SECRET) for i, ns in enumerate(spaces, 1)]
    try:
        for a in nodes:
            a.start()
        # Both have announced themselves before their LAN address exists.
        for a in nodes:
            wait_for(lambda a=a: "announced" in a.log_text(), timeout=60)
            assert "10.0.2.15" in a.log_text()
        for ns in spaces:
            lan.give_address(ns)
        for a in nodes:
            a.wait_up(60)
        yield nodes
    finally:
        for a in nodes:
            a.stop()


def test_late_lan_address_is_announced_and_each_finds_the_other_there(pair):
    one, two = pair
    wait_for(lambda: one.peer_names() == {two.name} and two.peer_names() == {one.name}, timeout=20)
    for me, other in ((one, two), (two, one)):
        (peer,) = me.view()["peers"]
        assert peer["host"] == other.ns.address, peer
        assert "announcing again" in me.log_text()


def test_a_node_never_takes_its_own_address_for_a_peer(pair):
    for a in pair:
        log = a.log_text()
        assert "refused" not in log, log[-2000:]
        assert "http://10.0.2.15" not in log, log[-2000:]
