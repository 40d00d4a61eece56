"""The household page's HTTP side against a fake runtime: sign-in, sessions, CSRF, cross-site refusals, the
rate limit, keys, the household-chat setting. The test client's address is not loopback, so every request
here is an off-host browser's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from hearth.api.app import create_app
from hearth.api.testing import FakeRouter, FakeRuntime
from hearth.config import Config
from hearth.page import routes, signin
from hearth.setup import password as pw

PASSWORD = "correct horse battery"


def _client(tmp_path: Path, config: Config | None = None, words: tuple[str, ...] = ("Hello", "!")) -> TestClient:
    runtime = FakeRuntime(tmp_path, config=config, router=FakeRouter(words=words))
    signin.store_password_hash(tmp_path, pw.sha512_crypt(PASSWORD))
    return TestClient(create_app(runtime), base_url="http://hearth-den.local:8080")


def _signed_in(client: TestClient) -> str:
    r = client.post("/page/v1/login", json={"password": PASSWORD})
    assert r.status_code == 200, r.text
    return str(r.json()["csrf"])


def test_every_admin_endpoint_refuses_a_request_without_a_session(tmp_path: Path) -> None:
    client = _client(tmp_path)
    for method, path in routes.ADMIN_ENDPOINTS:
        r = client.request(method, path, json={"name": "x", "model": "x"})
        assert r.status_code == 401, (method, path, r.status_code)
        assert "sign in" in r.json()["error"]["message"]
    # The list above is every /page/v1 route except the open ones: a new admin route cannot be forgotten.
    open_paths = {"/page/v1/session", "/page/v1/login", "/page/v1/models", "/page/v1/chat"}
    listed = {p.replace("/x", "/{name}") for _, p in routes.ADMIN_ENDPOINTS}
    declared = {r.path for r in routes.router.routes if r.path.startswith("/page/v1/")}  # type: ignore[attr-defined]
    assert declared - open_paths == listed


def test_the_page_is_served_with_a_strict_policy(tmp_path: Path) -> None:
    if not (routes.STATIC / "index.html").is_file():
        pytest.skip("the page is not built (bash ci/page)")
    client = _client(tmp_path)
    r = client.get("/", headers={"Accept-Encoding": "gzip"})
    assert r.status_code == 200 and "<title>Hearth</title>" in r.text
    assert r.headers["content-encoding"] == "gzip"
    assert "script-src 'self'" in r.headers["content-security-policy"]
    assert "frame-ancestors 'none'" in r.headers["content-security-policy"]
    assert client.get("/assets/app.js").headers["content-type"].startswith("text/javascript")
    assert client.get("/assets/../routes.py").status_code == 404


def test_a_wrong_password_is_refused_and_sign_in_is_rate_limited(tmp_path: Path) -> None:
    client = _client(tmp_path)
    for _ in range(5):
        r = client.post("/page/v1/login", json={"password": "wrong"})
        assert r.status_code == 401 and r.json()["error"]["message"] == "wrong password"
        assert signin.COOKIE not in r.cookies
    r = client.post("/page/v1/login", json={"password": PASSWORD})
    assert r.status_code == 429, "the right password must wait too: otherwise guessing goes on"
    assert int(r.headers["retry-after"]) >= 1
    assert client.get("/page/v1/keys").status_code == 401


def test_sign_in_sets_a_strict_http_only_cookie_and_admin_works_with_csrf(tmp_path: Path) -> None:
    client = _client(tmp_path)
    r = client.post("/page/v1/login", json={"password": PASSWORD})
    cookie = r.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie.replace("Strict", "strict")
    csrf = r.json()["csrf"]
    assert client.get("/page/v1/session").json()["signed_in"] is True
    assert client.get("/page/v1/keys").status_code == 200
    # A change without the CSRF token, or with another, is refused even with the cookie.
    assert client.post("/page/v1/keys", json={"name": "laptop"}).status_code == 403
    assert client.post("/page/v1/keys", json={"name": "laptop"}, headers={"X-Hearth-CSRF": "guess"}).status_code == 403
    made = client.post("/page/v1/keys", json={"name": "laptop"}, headers={"X-Hearth-CSRF": csrf})
    assert made.status_code == 201 and made.json()["key"].startswith("hearth-")
    listed = client.get("/page/v1/keys").json()["keys"]
    laptop = next(k for k in listed if k["name"] == "laptop")
    assert made.json()["key"] not in json.dumps(listed), "a key is shown once, then only masked"
    assert laptop["shown"].endswith(made.json()["key"][-4:])
    assert client.delete("/page/v1/keys/laptop", headers={"X-Hearth-CSRF": csrf}).status_code == 200
    assert "laptop" not in {k["name"] for k in client.get("/page/v1/keys").json()["keys"]}
    assert client.delete("/page/v1/keys/laptop", headers={"X-Hearth-CSRF": csrf}).status_code == 404
    assert client.post("/page/v1/logout", headers={"X-Hearth-CSRF": csrf}).status_code == 200
    assert client.get("/page/v1/keys").status_code == 401


def test_a_cross_site_request_is_refused_even_with_session_and_token(tmp_path: Path) -> None:
    client = _client(tmp_path)
    csrf = _signed_in(client)
    for headers in ({"Origin": "http://evil.example"}, {"Sec-Fetch-Site": "cross-site"}, {"Origin": "null"}):
        r = client.post("/page/v1/keys", json={"name": "evil"}, headers={"X-Hearth-CSRF": csrf, **headers})
        assert r.status_code == 403, headers
        assert "cross-site" in r.json()["error"]["message"]
        assert client.post("/page/v1/login", json={"password": PASSWORD}, headers=headers).status_code == 403
    assert "evil" not in {k["name"] for k in client.get("/page/v1/keys").json()["keys"]}
    same = client.post("/page/v1/keys", json={"name": "same"},
                       headers={"X-Hearth-CSRF": csrf, "Origin": "http://hearth-den.local:8080"})
    assert same.status_code == 201


def test_chat_needs_a_session_unless_the_household_may_chat(tmp_path: Path) -> None:
    client = _client(tmp_path)
    body = {"model": "fake", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    assert client.post("/page/v1/chat", json=body).status_code == 401
    csrf = _signed_in(client)
    r = client.post("/page/v1/chat", json=body, headers={"X-Hearth-CSRF": csrf})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    text = "".join(json.loads(line[5:])["choices"][0]["delta"].get("content", "")
                   for line in r.text.splitlines() if line.startswith("data:") and "[DONE]" not in line
                   and json.loads(line[5:])["choices"])
    assert text == "Hello!"

    open_chat = _client(tmp_path / "open", config=Config().replace(**{"page.household_chat": True}))
    assert open_chat.get("/page/v1/session").json()["chat"] is True
    assert open_chat.post("/page/v1/chat", json=body).status_code == 200
    models = open_chat.get("/page/v1/models").json()["models"]
    assert models[0]["name"] == "fake" and models[0]["nodes"]
    assert open_chat.get("/page/v1/household").status_code == 401, "household chat opens chat, nothing else"
    bad = open_chat.post("/page/v1/chat", json={"model": "fake", "messages": "hi"})
    assert bad.status_code == 400 and "messages" in bad.json()["error"]["message"]


def test_the_household_view_shows_this_node(tmp_path: Path) -> None:
    client = _client(tmp_path)
    csrf = _signed_in(client)
    view = client.get("/page/v1/household").json()
    assert view["nodes"][0]["self"] is True and view["downloads"] == []
    assert client.post("/page/v1/pull", json={"model": "x"}, headers={"X-Hearth-CSRF": csrf}).status_code == 400


def test_no_password_set_means_no_sign_in(tmp_path: Path) -> None:
    client = TestClient(create_app(FakeRuntime(tmp_path)))
    assert client.get("/page/v1/session").json()["password_set"] is False
    r = client.post("/page/v1/login", json={"password": "anything"})
    assert r.status_code == 409 and "no admin password" in r.json()["error"]["message"]


def test_setup_copies_the_admin_hash_for_the_agent(tmp_path: Path) -> None:
    hashed = pw.sha512_crypt(PASSWORD)
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc/shadow").write_text(f"root:*:1::::::\nadmin:{hashed}:20000:0:99999:7:::\n")
    state = tmp_path / "var/lib/hearth"
    assert "admin password" in signin.copy_from_shadow(tmp_path, state)
    assert signin.load_password_hash(state, root=Path("/nonexistent")) == hashed
    assert (signin.password_path(state).stat().st_mode & 0o777) == 0o600
    assert signin.check_password(PASSWORD, hashed) and not signin.check_password("nope", hashed)
    assert not signin.check_password(PASSWORD, None)


def test_sessions_expire_and_are_kept_by_hash_only() -> None:
    sessions = signin.Sessions(ttl=0.05)
    token, session = sessions.create()
    assert sessions.get(token) is session
    assert token not in repr(sessions._by_digest)
    import time

    time.sleep(0.1)
    assert sessions.get(token) is None
    assert sessions.get(None) is None and sessions.get("forged") is None


def test_loopback_is_open_only_when_asked_by_a_loopback_name(tmp_path: Path) -> None:
    runtime = FakeRuntime(tmp_path)
    for i, (base, open_) in enumerate((("http://127.0.0.1:8080", True), ("http://localhost:8080", True), ("http://[::1]:8080", True),
                        ("http://attacker.example:8080", False))):
        client = TestClient(create_app(runtime), base_url=base, client=("127.0.0.1", 40000))
        session = client.get("/page/v1/session").json()
        assert session["admin"] is open_, base
        assert client.get("/page/v1/keys").status_code == (200 if open_ else 401), base
        if open_:
            # Loopback needs no session, but a change still needs the token only the page can read.
            assert client.post("/page/v1/keys", json={"name": "k"}).status_code == 403
            made = client.post("/page/v1/keys", json={"name": f"k{i}"},
                               headers={"X-Hearth-CSRF": session["csrf"]})
            assert made.status_code == 201
    closed = FakeRuntime(tmp_path / "closed", config=Config().replace(**{"api.open_loopback": False}))
    client = TestClient(create_app(closed), base_url="http://127.0.0.1:8080", client=("127.0.0.1", 40000))
    assert client.get("/page/v1/keys").status_code == 401


def test_a_partial_download_in_the_store_shows_as_a_download(tmp_path: Path) -> None:
    from hearth.models.store import Store

    client = _client(tmp_path, config=Config().replace(**{"state.dir": str(tmp_path)}))
    _signed_in(client)
    store = Store.from_config(Config().replace(**{"state.dir": str(tmp_path)}))
    store.ensure()
    store.partial_dir.mkdir(parents=True, exist_ok=True)
    store.partial_path("big.gguf").write_bytes(b"x" * 1000)
    store.journal_path("big.gguf").write_text(json.dumps({"file": "big.gguf", "total": 4000, "source": "test"}))
    downloads = client.get("/page/v1/household").json()["downloads"]
    assert downloads == [{"model": "big.gguf", "completed": 1000, "total": 4000, "status": "partly downloaded",
                          "state": "partial", "by": "store"}]


def _yescrypt(password: str) -> str:
    """A yescrypt hash, as trixie's passwd writes it, made by the system's libxcrypt."""
    import ctypes
    import ctypes.util

    lib = ctypes.CDLL(ctypes.util.find_library("crypt") or "libcrypt.so.1")
    lib.crypt_gensalt.restype = lib.crypt.restype = ctypes.c_char_p
    lib.crypt_gensalt.argtypes = [ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p, ctypes.c_int]
    lib.crypt.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
    setting = lib.crypt_gensalt(b"$y$", 0, None, 0)
    return lib.crypt(password.encode(), setting).decode()


def test_passwd_admin_later_changes_the_page_password_too(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    """hearth-page-password.path runs 'hearth setup page-password' when /etc/shadow changes: the page then
    takes the new password (yescrypt, what passwd writes on trixie), refuses the old, and a locked admin
    password signs nobody in."""
    from hearth.cli import main

    (tmp_path / "etc").mkdir()
    shadow = tmp_path / "etc/shadow"
    shadow.write_text(f"root:*:1::::::\nadmin:{pw.sha512_crypt(PASSWORD)}:20000:0:99999:7:::\n")
    (tmp_path / "hearth.yaml").write_text("node:\n  name: den\n")
    monkeypatch.setenv("HEARTH_CONFIG", str(tmp_path / "hearth.yaml"))
    state = tmp_path / "var/lib/hearth"
    assert main(["setup", "page-password", "--root", str(tmp_path)]) == 0

    new = _yescrypt("a brand new passphrase")
    assert new.startswith("$y$")
    shadow.write_text(f"root:*:1::::::\nadmin:{new}:20001:0:99999:7:::\n")  # passwd admin
    assert main(["setup", "page-password", "--root", str(tmp_path)]) == 0
    assert "admin password" in capsys.readouterr().out
    hashed = signin.load_password_hash(state, root=Path("/nonexistent"))
    assert hashed == new
    assert signin.check_password("a brand new passphrase", hashed)
    assert not signin.check_password(PASSWORD, hashed) and not signin.check_password("a brand new passphras", hashed)

    # A shadow file that cannot be read (not root; here: gone) changes nothing, and the command says so.
    shadow.rename(tmp_path / "shadow.kept")
    assert "keeps the admin password" in signin.copy_from_shadow(tmp_path, state)
    assert signin.load_password_hash(state, root=Path("/nonexistent")) == new
    assert main(["setup", "page-password", "--root", str(tmp_path)]) != 0
    assert "cannot read" in capsys.readouterr().err
    (tmp_path / "shadow.kept").rename(shadow)

    shadow.write_text(f"root:*:1::::::\nadmin:!{new}:20002:0:99999:7:::\n")  # passwd -l admin
    assert main(["setup", "page-password", "--root", str(tmp_path)]) == 0
    assert signin.load_password_hash(state, root=Path("/nonexistent")) is None
    assert not signin.password_path(state).exists()
