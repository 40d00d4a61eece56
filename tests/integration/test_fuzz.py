"""Schema-driven fuzzing: schemathesis generates valid and invalid requests for every operation in the
OpenAPI document; the API must never answer 5xx, and every refusal carries a message."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from hearth.api.app import create_app
from hearth.api.keys import KeyStore, keys_path
from hearth.api.testing import FakeRouter, FakeRuntime

EXAMPLES = 30
"""Per operation (12 operations): a few hundred requests, well under a minute."""

SEEN: Counter[int] = Counter()


@pytest.fixture(scope="module")
def fuzz_runtime(tmp_path_factory: pytest.TempPathFactory) -> FakeRuntime:
    return FakeRuntime(tmp_path_factory.mktemp("fuzz"), router=FakeRouter(any_model=True))


@pytest.fixture(scope="module")
def api_schema(fuzz_runtime: FakeRuntime):  # type: ignore[no-untyped-def]
    return schemathesis.openapi.from_asgi("/openapi.json", create_app(fuzz_runtime))


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_server_errors(case: schemathesis.Case, fuzz_runtime: FakeRuntime) -> None:
    key = KeyStore(keys_path(fuzz_runtime.state_dir)).get("default").key
    # The test client is not on loopback, so the API wants a key: fuzz what lies behind the door.
    response = case.call(headers={"Authorization": f"Bearer {key}"})
    SEEN[response.status_code] += 1
    assert response.status_code < 500, f"{case.method} {case.path} -> {response.status_code}: {response.text[:500]}"
    if response.status_code >= 400:
        body = response.json()
        message = body["error"] if case.path.startswith("/api/") else body["error"]["message"]
        assert isinstance(message, str) and message


def test_openapi_describes_the_bodies(fuzz_runtime: FakeRuntime) -> None:
    doc = create_app(fuzz_runtime).openapi()
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/api/chat", "/api/generate"):
        body = doc["paths"][path]["post"]["requestBody"]
        assert body["required"] is True and "application/json" in body["content"]


def test_still_serving_after_fuzz(fuzz_runtime: FakeRuntime, tmp_path: Path) -> None:
    # The fuzz ran both accepted and refused requests (else it proved little).
    assert sum(n for s, n in SEEN.items() if s < 300) > 100 and sum(n for s, n in SEEN.items() if s >= 400) > 50, SEEN
    print("fuzz statuses:", dict(SEEN))
    from starlette.testclient import TestClient

    app = create_app(fuzz_runtime)
    with TestClient(app, client=("127.0.0.1", 5000)) as c:
        r = c.post("/v1/chat/completions", json={"model": "fake", "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "Hello, world!"
