"""API keys: made on first start, 0600, checked in constant time, required off loopback."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import httpx
import pytest

from hearth.api.app import create_app
from hearth.api.keys import ApiKeyError, KeyStore, keys_path
from hearth.api.testing import FakeRuntime

CHAT = {"model": "fake", "messages": [{"role": "user", "content": "hi"}]}
LAN = ("192.168.1.20", 50123)


def test_first_start_makes_a_private_key(tmp_path: Path) -> None:
    create_app(FakeRuntime(tmp_path))
    path = keys_path(tmp_path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    keys = KeyStore(path).load()
    assert [k.name for k in keys] == ["default"] and keys[0].key.startswith("hearth-") and len(keys[0].key) > 40
    create_app(FakeRuntime(tmp_path))  # a restart keeps it
    assert KeyStore(path).load() == keys


def test_create_list_revoke(tmp_path: Path) -> None:
    store = KeyStore(keys_path(tmp_path))
    store.ensure_default()
    laptop = store.create("laptop")
    assert store.check(laptop.key) and not store.check(laptop.key + "x") and not store.check("")
    with pytest.raises(ApiKeyError, match="exists"):
        store.create("laptop")
    with pytest.raises(ApiKeyError, match="bad key name"):
        store.create("no spaces please")
    store.revoke("laptop")
    assert [k.name for k in store.load()] == ["default"]
    with pytest.raises(ApiKeyError, match="no key named"):
        store.revoke("laptop")
    assert "…" in store.get("default").shown and store.get("default").key not in store.get("default").shown


def test_damaged_file_is_a_clear_error(tmp_path: Path) -> None:
    path = keys_path(tmp_path)
    path.write_text("{not json")
    with pytest.raises(ApiKeyError, match="damaged"):
        KeyStore(path).load()
    assert not KeyStore(path).check("anything")


@pytest.fixture
def lan_runtime(tmp_path: Path) -> FakeRuntime:
    return FakeRuntime(tmp_path)


async def _client(runtime: FakeRuntime, client: tuple[str, int]) -> httpx.AsyncClient:
    app = create_app(runtime)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app, client=client), base_url="http://node")


async def test_lan_client_needs_a_key(lan_runtime: FakeRuntime) -> None:
    async with await _client(lan_runtime, LAN) as c:
        key = KeyStore(keys_path(lan_runtime.state_dir)).get("default").key
        r = await c.post("/v1/chat/completions", json=CHAT)
        assert r.status_code == 401 and "Authorization: Bearer" in r.json()["error"]["message"]
        assert r.json()["error"]["code"] == "invalid_api_key"
        r = await c.post("/v1/chat/completions", json=CHAT, headers={"Authorization": "Bearer hearth-wrong"})
        assert r.status_code == 401 and "invalid API key" in r.json()["error"]["message"]
        r = await c.post("/v1/chat/completions", json=CHAT, headers={"Authorization": f"Basic {key}"})
        assert r.status_code == 401 and "Bearer" in r.json()["error"]["message"]
        r = await c.post("/api/chat", json=CHAT)
        assert r.status_code == 401 and "key" in r.json()["error"]
        assert (await c.get("/metrics")).status_code == 401
        # /health stays open (load balancers, the image's check unit)
        assert (await c.get("/health")).status_code == 200
        r = await c.post("/v1/chat/completions", json=CHAT, headers={"Authorization": f"Bearer {key}"})
        assert r.status_code == 200
        assert lan_runtime.router.records and len(lan_runtime.router.records) == 1


async def test_new_key_works_without_restart_and_revoked_key_stops(lan_runtime: FakeRuntime) -> None:
    async with await _client(lan_runtime, LAN) as c:
        store = KeyStore(keys_path(lan_runtime.state_dir))
        new = store.create("phone")
        app_store = c._transport.app.state.hearth.keys  # type: ignore[attr-defined]
        app_store._checked = 0.0  # skip the once-a-second re-read delay
        r = await c.get("/v1/models", headers={"Authorization": f"Bearer {new.key}"})
        assert r.status_code == 200
        store.revoke("phone")
        app_store._checked = 0.0
        r = await c.get("/v1/models", headers={"Authorization": f"Bearer {new.key}"})
        assert r.status_code == 401


@pytest.mark.parametrize("client", [("127.0.0.1", 4000), ("::1", 4000), ("::ffff:127.0.0.1", 4000)])
async def test_loopback_is_open_unless_configured(tmp_path: Path, client: tuple[str, int]) -> None:
    async with await _client(FakeRuntime(tmp_path), client) as c:
        assert (await c.post("/v1/chat/completions", json=CHAT)).status_code == 200
    closed = FakeRuntime(tmp_path, config=FakeRuntime(tmp_path).config.replace(**{"api.open_loopback": False}))
    async with await _client(closed, client) as c:
        assert (await c.post("/v1/chat/completions", json=CHAT)).status_code == 401
        key = json.loads(keys_path(tmp_path).read_text())["keys"][0]["key"]
        r = await c.post("/v1/chat/completions", json=CHAT, headers={"authorization": f"bearer {key}"})
        assert r.status_code == 200
