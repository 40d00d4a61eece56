"""The page's security in a real browser and over real HTTP: admin endpoints need a session, a cross-site
request is refused, model output that contains HTML renders as text; and the page's weight on first load."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
from pagelab import PASSWORD, set_password, sign_in, wait_until

from hearth.page.routes import ADMIN_ENDPOINTS

PAGE_BUDGET = 100 * 1024
"""Bytes a first visit may transfer (HTML, script, style, the first API answers): kept small for phones."""


@pytest.fixture
def closed_agent(agent_factory: Any) -> Any:
    """A real agent serving no model, closed to unsigned callers even on loopback."""
    agent = agent_factory("none", api__open_loopback=False)
    set_password(agent.state_dir)
    return agent


def test_every_admin_endpoint_refuses_a_request_without_a_session(closed_agent: Any) -> None:
    for method, path in ADMIN_ENDPOINTS:
        r = httpx.request(method, closed_agent.url + path, json={"name": "x", "model": "x"}, timeout=10)
        assert r.status_code == 401, (method, path, r.status_code, r.text)
    # A forged cookie is no session either.
    r = httpx.get(closed_agent.url + "/page/v1/keys", cookies={"hearth_session": "forged"}, timeout=10)
    assert r.status_code == 401
    # Chat too, until page.household_chat is on.
    r = httpx.post(closed_agent.url + "/page/v1/chat", json={"model": "x", "messages": []}, timeout=10)
    assert r.status_code == 401


@pytest.fixture
def other_site() -> Iterator[str]:
    """Another origin on this machine: a plain HTTP server with an empty page (and no policy of its own)."""
    class Blank(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            body = b"<!doctype html><title>another site</title>"
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Blank)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_a_cross_site_request_is_refused(closed_agent: Any, desktop: Any, other_site: str) -> None:
    own = closed_agent.url  # http://127.0.0.1:PORT
    page = desktop.new_page()
    page.goto(own + "/")
    sign_in(page)
    page.wait_for_selector("#chat", state="visible")
    # Another origin in the same browser tries the classic forgeries: a POST that needs no preflight, with
    # the cookie asked for, and a read of an admin answer. From another port of the same host the browser
    # even sends the SameSite=Strict cookie (same site): the Origin check is what refuses it.
    forgeries = """async (target) => {
        const simple = await fetch(target + '/page/v1/keys', {method: 'POST', mode: 'no-cors', credentials: 'include',
            headers: {'Content-Type': 'text/plain'}, body: JSON.stringify({name: 'evil'})});
        const logout = await fetch(target + '/page/v1/logout', {method: 'POST', mode: 'no-cors', credentials: 'include'});
        let read;
        try { read = await (await fetch(target + '/page/v1/keys', {credentials: 'include'})).text(); }
        catch (e) { read = 'blocked: ' + e.name; }
        return {simple: simple.type, logout: logout.type, read};
    }"""
    for origin in (other_site, other_site.replace("127.0.0.1", "localhost")):
        evil = desktop.new_page()
        evil.goto(origin + "/")
        outcome = evil.evaluate(forgeries, own)
        assert outcome["simple"] == "opaque" and outcome["logout"] == "opaque"
        assert outcome["read"].startswith("blocked"), "another site can never read the node's answers"
        evil.close()
    # The signed-in page itself sees that no key was made and that it is still signed in.
    keys = page.evaluate("async () => (await (await fetch('page/v1/keys')).json()).keys.map(k => k.name)")
    assert "evil" not in keys and "default" in keys
    # And over plain HTTP, with the real session cookie and CSRF token, a foreign Origin is still refused.
    cookie = next(c["value"] for c in desktop.cookies() if c["name"] == "hearth_session")
    csrf = page.evaluate("async () => (await (await fetch('page/v1/session')).json()).csrf")
    r = httpx.post(own + "/page/v1/keys", json={"name": "evil"}, cookies={"hearth_session": cookie},
                   headers={"X-Hearth-CSRF": csrf, "Origin": "http://evil.example"}, timeout=10)
    assert r.status_code == 403 and "cross-site" in r.json()["error"]["message"]
    r = httpx.post(own + "/page/v1/keys", json={"name": "mine"}, cookies={"hearth_session": cookie},
                   headers={"X-Hearth-CSRF": csrf, "Origin": own}, timeout=10)
    assert r.status_code == 201, "the same request from the page's own origin works"


def test_model_output_with_script_renders_as_text(closed_agent: Any, desktop: Any) -> None:
    """The renderer in the browser, fed an answer that tries every trick (the answer is served by the test)."""
    hostile = ("Here: <script>window.__pwned = 1</script> and <img src=x onerror=\"window.__pwned = 2\">"
               "\n\n[click](javascript:window.__pwned=3) <iframe src=\"javascript:parent.__pwned=4\"></iframe>"
               "\n\n```html\n<script>window.__pwned = 5</script>\n```\n")
    chunks = [hostile[i:i + 7] for i in range(0, len(hostile), 7)]
    sse = "".join("data: " + json.dumps({"choices": [{"index": 0, "delta": {"content": c}}]}) + "\n\n"
                  for c in chunks) + "data: [DONE]\n\n"
    page = desktop.new_page()
    page.route("**/page/v1/models", lambda route: route.fulfill(
        json={"models": [{"name": "hostile", "nodes": ["test"], "local": True, "loaded": True, "context_length": 0,
                          "pool": []}]}))
    page.route("**/page/v1/chat", lambda route: route.fulfill(status=200, body=sse,
                                                              headers={"Content-Type": "text/event-stream"}))
    page.goto(closed_agent.url + "/")
    sign_in(page, PASSWORD)
    wait_until(page, "[...document.querySelectorAll('#model option')].some(o => o.value === 'hostile')")
    page.fill("#prompt", "say something")
    page.press("#prompt", "Enter")
    page.wait_for_selector(".msg.assistant .meta")
    answer = page.locator(".msg.assistant")
    text = answer.inner_text()
    assert "<script>window.__pwned = 1</script>" in text, text
    assert '<img src=x onerror="window.__pwned = 2">' in text
    assert answer.locator("script, img, iframe").count() == 0
    assert answer.locator("a[href^='javascript']").count() == 0
    assert answer.locator("pre code").inner_text().strip() == "<script>window.__pwned = 5</script>"
    page.wait_for_timeout(300)
    assert page.evaluate("window.__pwned") is None


def test_the_page_is_light_on_first_load(closed_agent: Any, desktop: Any, capsys: pytest.CaptureFixture[str]) -> None:
    page = desktop.new_page()
    page.goto(closed_agent.url + "/", wait_until="networkidle")
    entries = page.evaluate("""() => [...performance.getEntriesByType('navigation'),
                                      ...performance.getEntriesByType('resource')]
                                     .map(e => ({name: e.name, bytes: e.transferSize, body: e.decodedBodySize}))""")
    total = sum(e["bytes"] for e in entries)
    assert any(e["name"].endswith("/assets/app.js") for e in entries)
    assert all(e["name"].startswith(closed_agent.url) for e in entries), "nothing comes from anywhere else"
    with capsys.disabled():
        print(f"\nhousehold page, first load: {total} bytes transferred in {len(entries)} requests "
              f"({sum(e['body'] for e in entries)} bytes unpacked)")
    assert 0 < total <= PAGE_BUDGET, entries
