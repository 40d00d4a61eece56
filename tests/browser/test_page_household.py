"""The household page of a node in a network namespace pair, seen from the host across the bridge: the
browser is off the node, so it signs in; both nodes show with their hardware, and the join code shows as
text and as a QR code. Needs root (ip netns)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
from pagelab import meshlab, set_password, shot, sign_in

SECRET = bytes(range(1, 33))


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, Any]]:
    """Nodes A and B of one household on a bridge, finding each other over mDNS."""
    meshlab.need_netns()
    lan = meshlab.Lan()
    base = tmp_path_factory.mktemp("pair")
    a = meshlab.Agent(lan.add(), "hearth-den", base / "A", SECRET)
    b = meshlab.Agent(lan.add(), "hearth-attic", base / "B", SECRET)
    try:
        for node in (a, b):
            node.start()
        for node in (a, b):
            node.wait_up(90)
        set_password(a.state)
        meshlab.wait_for(lambda: a.peer_names() == {"hearth-attic"}, timeout=30)
        yield a, b
    finally:
        for node in (a, b):
            node.stop()
        lan.close()


def _both_nodes(page: Any) -> None:
    page.wait_for_selector(".node[data-node=hearth-den]")
    page.wait_for_selector(".node[data-node=hearth-attic]")


def test_both_nodes_of_a_pair_show_on_the_household_page(pair: tuple[Any, Any], desktop: Any, phone: Any) -> None:
    a, b = pair
    page = desktop.new_page()
    page.goto(a.url + "/")
    page.click("#tabs button[data-tab=household]")
    sign_in(page)  # the browser is across the bridge, not on the node: it must sign in
    page.wait_for_selector("#household", state="visible")
    _both_nodes(page)
    den = page.inner_text(".node[data-node=hearth-den]")
    attic = page.locator(".node[data-node=hearth-attic]")
    assert "this node" in den and a.ns.address in den and "CPU" in den and "memory" in den
    assert b.ns.address in attic.inner_text()
    # The peer's hardware comes from the peer itself.
    attic.locator("dt", has_text="memory").wait_for()
    assert "GiB" in attic.inner_text() and "not reported" not in attic.inner_text()
    last_seen = attic.locator("dt:text-is('last seen') + dd").inner_text()
    assert last_seen == "just now" or last_seen.endswith("s ago"), last_seen

    from hearth.mesh import household

    code = household.code_for(SECRET)
    assert page.inner_text("#join-code") == code
    drawn = page.evaluate("""() => { const c = document.getElementById('join-qr');
        const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        let dark = 0; for (let i = 0; i < d.length; i += 4) if (d[i] < 128) dark++; return dark / (d.length / 4); }""")
    assert 0.2 < drawn < 0.8, f"a QR code is drawn (dark share {drawn:.2f})"
    shot(page, "household-desktop")

    mobile = phone.new_page()
    mobile.goto(a.url + "/")
    mobile.click("#tabs button[data-tab=household]")
    sign_in(mobile)
    _both_nodes(mobile)
    assert mobile.evaluate("document.documentElement.scrollWidth <= window.innerWidth + 1")
    time.sleep(0.2)
    shot(mobile, "household-phone")
