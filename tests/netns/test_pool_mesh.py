"""A household pool across network namespaces, over the mesh's encrypted channel (Gemma 3 270M).

Three real agents on a bridge. Memory caps in config (``pool.max_ram_mib``) let no node hold the model
alone: A and B offer the most, C (the pool's head: it has the file and ``pool.serve`` names it) a little
less. The greedy output streamed with the ``openai`` client through C must equal a single-node run of the
same file. Then A is killed mid-stream: the stream ends with a clean error within 5 s, the pool
re-forms on B and C, and the next request is served.
"""

from __future__ import annotations

import asyncio
import importlib.util
import subprocess
import time
from pathlib import Path

import pytest
from meshlab import PYTHON, ROOT, Agent, openai_stream, wait_for

if importlib.util.find_spec("llama_cpp") is None:
    pytest.skip("the pool tests serve a real model through the runtime", allow_module_level=True)
if importlib.util.find_spec("hearth.mesh.channel") is None:
    pytest.skip("the pool reaches peers' rpc-servers only through the mesh's channel (hearth.mesh.channel)",
                allow_module_level=True)

SECRET = bytes(range(7, 39))
LOCAL = "http://127.0.0.1:8080"
PROMPT = "Write a short story about a lighthouse keeper."
POOLED = "gemma-pooled"


def pool_view(agent: Agent) -> dict:
    """The 'pool' part of the agent's /health."""
    return dict(agent.local_get("/health").get("pool") or {})


@pytest.fixture(scope="module")
def pool(lan, tmp_path_factory, gemma_path):
    from hearth.pool.plan import layout_from_gguf

    base = tmp_path_factory.mktemp("pool")
    layout = layout_from_gguf(gemma_path, 1024)  # meshlab's model.context
    need = layout.total
    big = (layout.output_bytes + layout.overhead + (layout.n_layers // 2 + 2) * layout.per_layer) >> 20
    small = big - 8
    assert big << 20 < need
    pooled = base / f"{POOLED}.gguf"
    pooled.symlink_to(gemma_path)
    common = {"reserve_mib": 0, "threads": 1}
    a = Agent(lan.add(), "hearth-a", base / "A", SECRET, settings={"pool": {**common, "max_ram_mib": big}})
    b = Agent(lan.add(), "hearth-b", base / "B", SECRET, settings={"pool": {**common, "max_ram_mib": big}})
    c = Agent(lan.add(), "hearth-c", base / "C", SECRET, store=(pooled,),
              settings={"pool": {**common, "max_ram_mib": small, "serve": [POOLED]}})
    nodes = {"A": a, "B": b, "C": c, "gemma": gemma_path, "base": base}
    try:
        for n in (a, b, c):
            n.start()
        for n in (a, b, c):
            n.wait_up(120)
        wait_for(lambda: (pool_view(c).get("models") or {}).get(POOLED, {}).get("state") == "ready",
                 timeout=300, interval=0.5)
        yield nodes
    finally:
        for n in (a, b, c):
            n.stop()


def one_node(gemma: Path, run_dir: Path, prompt: str, max_tokens: int) -> str:
    """The same greedy chat on one llama-server, computing with the kernels rpc-server uses (no repacking:
    rpc-server's CPU buffers never repack, and repacked kernels can flip a near-tie)."""
    from hearth.serving.local import Pool
    from hearth.serving.types import GenerationRequest, TokenChunk

    async def run() -> str:
        serving = Pool(run_dir)
        up = serving.add("reference", gemma, context=1024, slots=1, threads=1, repack=False, chat_format="gemma")
        try:
            assert await up.worker.wait_ready(180), up.worker.error
            req = GenerationRequest(model="reference", kind="chat", max_tokens=max_tokens, temperature=0.0,
                                    messages=({"role": "user", "content": prompt},))
            return "".join([ev.text async for ev in up.generate(req) if isinstance(ev, TokenChunk)])
        finally:
            await serving.stop()

    return asyncio.run(run())


def test_split_across_two_namespaces_answers_like_one_node(pool):
    c = pool["C"]
    members = [m["name"] for m in pool_view(c)["models"][POOLED]["members"]]
    assert sorted(set(members)) == ["hearth-a", "hearth-b"], members
    split = openai_stream(c.ns, LOCAL, POOLED, PROMPT, max_tokens=32)
    one = one_node(pool["gemma"], pool["base"] / "reference", PROMPT, 32)
    assert len(split["chunks"]) > 5 and "".join(split["chunks"]) == one
    models = c.local_get("/v1/models")
    listed = {m["id"]: m.get("pool") for m in models["data"]}
    assert sorted(listed[POOLED]) == ["hearth-a", "hearth-b"], models


def test_a_member_killed_mid_stream_ends_it_cleanly_and_the_pool_reforms(pool):
    a, c = pool["A"], pool["C"]
    code = f"""
import openai, time
c = openai.OpenAI(base_url="{LOCAL}/v1", api_key="none", max_retries=0, timeout=60)
n = 0
try:
    for ch in c.chat.completions.create(model={POOLED!r}, messages=[{{"role": "user", "content": {PROMPT!r}}}],
                                         max_tokens=1000, temperature=0, stream=True):
        if ch.choices and ch.choices[0].delta.content:
            n += 1
            if n == 3:
                print("streaming", flush=True)
    print("finished", n, flush=True)
except Exception as e:
    print("error", type(e).__name__, time.monotonic(), flush=True)
"""
    proc = subprocess.Popen(["ip", "netns", "exec", c.ns.name, PYTHON, "-c", code], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "streaming"
    a.kill()
    killed = time.monotonic()
    # A pulled plug takes the node's rpc-server with it (systemd stops the whole unit; here we do).
    pids = subprocess.run(["ip", "netns", "pids", a.ns.name], capture_output=True, text=True).stdout.split()
    subprocess.run(["kill", "-9", *pids], capture_output=True)
    out, _ = proc.communicate(timeout=60)
    assert out.startswith("error"), out
    assert float(out.split()[2]) - killed < 5.0, out  # CLOCK_MONOTONIC is shared across namespaces
    after = openai_stream(c.ns, LOCAL, POOLED, PROMPT, max_tokens=8)
    assert len(after["chunks"]) > 2
    members = {m["name"] for m in pool_view(c)["models"][POOLED]["members"]}
    assert members == {"hearth-b", "hearth-c"}, members
