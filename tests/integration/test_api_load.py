"""100 concurrent clients against one node: each completes or gets an explicit 429/503, memory stays bounded,
and the node serves normally afterwards."""

from __future__ import annotations

import asyncio
import collections
from typing import Any

import httpx

RunningAgent = Any


def _rss_kib(pid: int) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


async def _one(c: httpx.AsyncClient, i: int, model: str) -> tuple[int, str]:
    body = {"model": model, "prompt": f"Story {i}: once upon a time", "max_tokens": 4, "stream": i % 2 == 0}
    r = await c.post("/v1/completions", json=body)
    text = r.text
    if r.status_code == 200 and body["stream"]:
        assert text.endswith("data: [DONE]\n\n"), text[-300:]
    if r.status_code in (429, 503):
        assert "retry-after" in r.headers and r.json()["error"]["message"]
    return r.status_code, text


def test_hundred_concurrent_clients(running_agent: RunningAgent) -> None:
    rss_before = _rss_kib(running_agent.process.pid)

    async def main() -> list[tuple[int, str]]:
        limits = httpx.Limits(max_connections=200)
        async with httpx.AsyncClient(base_url=running_agent.url, timeout=300, limits=limits) as c:
            return await asyncio.gather(*(_one(c, i, running_agent.model) for i in range(100)))

    results = asyncio.run(main())
    statuses = collections.Counter(s for s, _ in results)
    print("statuses of 100 concurrent requests:", dict(statuses))
    assert set(statuses) <= {200, 429, 503}, statuses
    assert statuses[200] >= 1 and statuses[429] >= 1  # some served, the overflow refused explicitly
    rss_after = _rss_kib(running_agent.process.pid)
    assert rss_after - rss_before < 100 * 1024, (rss_before, rss_after)
    r = httpx.post(running_agent.url + "/v1/completions",
                   json={"model": running_agent.model, "prompt": "Hello", "max_tokens": 3}, timeout=60)
    assert r.status_code == 200
    assert running_agent.health().json()["models"][running_agent.model]["queued"] == 0
