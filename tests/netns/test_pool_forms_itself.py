"""A node forms a household pool by itself (``pool.auto``), in network namespaces (Gemma 3 270M).

B runs on ``model.name: auto`` with its own model's RAM capped in config (``model.max_ram_mib``) below what
any catalogue model needs: its profile ('cpu-small' at that size, whatever this machine has) finds nothing
that fits it alone. A serves nothing and offers memory to the pool (``pool.max_ram_mib``): enough for Gemma
3 270M with the selection's margin, too little for Qwen2.5 0.5B, the model ranked above it. Nobody names a
model for the pool (no ``pool.serve``, no request): B weighs A's signed offer, forms the pool with A as its
member and serves Gemma through it. /v1/models and ``hearth status`` on B show the pooled model and its
member, and a chat sent to A (routed to B over the channel) is answered. A has Gemma's file in its own store
(without serving it), so its share's big weights come from its disk, not over the channel.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess

import pytest
from meshlab import PYTHON, ROOT, Agent, openai_stream, wait_for

if importlib.util.find_spec("llama_cpp") is None:
    pytest.skip("the pool tests serve a real model through the runtime", allow_module_level=True)
if importlib.util.find_spec("hearth.mesh.channel") is None:
    pytest.skip("the pool reaches peers' rpc-servers only through the mesh's channel (hearth.mesh.channel)",
                allow_module_level=True)

SECRET = bytes(range(11, 43))
LOCAL = "http://127.0.0.1:8080"
MODEL = "gemma3-270m"
CONTEXT = 1024
"""meshlab's model.context: selection sizes every model at exactly this context."""


def offer_mib() -> int:
    """A's offer: the selection's need for Gemma 3 270M (its estimate plus the margin), with a little room,
    and below the need of every model the 'cpu-small' class ranks above it."""
    from hearth.select import estimate, load_catalogue, load_profiles

    profiles = load_profiles()
    ranked = next(c for c in profiles.classes if c.name == "cpu-small").models
    catalogue = {m.name: m for m in load_catalogue()}
    need = {n: estimate(catalogue[n], CONTEXT, profiles.margin).total >> 20 for n in ranked}
    offer = need[MODEL] + 32
    above = ranked[:ranked.index(MODEL)]
    assert above and all(need[n] > offer for n in above), need
    return offer


@pytest.fixture(scope="module")
def household(lan, tmp_path_factory, gemma_path):
    base = tmp_path_factory.mktemp("auto")
    a = Agent(lan.add(), "hearth-a", base / "A", SECRET, store=(gemma_path,),
              settings={"pool": {"reserve_mib": 0, "threads": 1, "max_ram_mib": offer_mib()}})
    # B keeps its memory for itself (1 MiB offered: no member device) and its own model may take 1 GiB,
    # less than Gemma 3 270M's estimate with the margin: nothing fits B alone.
    b = Agent(lan.add(), "hearth-b", base / "B", SECRET, model="auto", store=(gemma_path,),
              settings={"model": {"max_ram_mib": 1024}, "pool": {"reserve_mib": 0, "threads": 1, "max_ram_mib": 1}})
    assert gemma_path.name == "gemma-3-270m-q4_k_m.gguf"  # the catalogue's file name: B finds it in its store
    try:
        for n in (a, b):
            n.start()
        for n in (a, b):
            n.wait_up(120)
        # B weighs the offers every 10 s; then the pool forms (A receives its layers over the channel).
        wait_for(lambda: (b.local_get("/health").get("pool") or {}).get("models", {}).get(MODEL, {}).get("state")
                 == "ready", timeout=240, interval=0.5)
        yield {"A": a, "B": b}
    finally:
        for n in (a, b):
            n.stop()


def test_the_node_forms_the_pool_by_itself_and_shows_it(household):
    a, b = household["A"], household["B"]
    assert "no model fits this node" in b.log_text() and "(model.max_ram_mib)" in b.log_text()
    assert "running it across the household pool" in b.log_text()
    pooled = b.local_get("/health")["pool"]["models"][MODEL]
    assert [m["name"] for m in pooled["members"]] == ["hearth-a"], pooled
    assert sum(m["layers"] for m in pooled["members"]) == 18 and pooled["members"][-1]["output"], pooled
    listed = {m["id"]: m.get("pool") for m in b.local_get("/v1/models")["data"]}
    assert listed.get(MODEL) == ["hearth-a"], listed
    status = subprocess.run(["ip", "netns", "exec", b.ns.name, PYTHON, "-m", "hearth", "--config", str(b.config_path),
                             "status"], capture_output=True, text=True, timeout=60, cwd=ROOT)
    # Nothing fit B alone, but it serves: ready, the reason kept as a warning.
    assert status.returncode == 0 and re.search(r"^status\s+ready$", status.stdout, re.M), status.stdout + status.stderr
    assert re.search(rf"^pooled\s+{MODEL} \(hearth-a 18 layers \+ output\)$", status.stdout, re.M), status.stdout
    # A serves nothing itself and asked for nothing: once B's signed state says what B serves, the chat A
    # takes goes to B's pooled model.
    wait_for(lambda: MODEL in {m["id"] for m in a.local_get("/v1/models").get("data", [])}, timeout=30, interval=0.3)
    answer = openai_stream(a.ns, LOCAL, MODEL, "Write a short story about a lighthouse keeper.", max_tokens=12)
    assert len(answer["chunks"]) > 2, answer


def test_a_member_loads_its_share_from_its_own_store(household):
    a = household["A"]
    # A's agent named its model store to its rpc-server, which indexed the GGUF in it ...
    rpc_cache = a.state / "pool" / "cache" / "rpc"
    assert (rpc_cache / "stores").read_text().split() == [str((a.state / "models").resolve())]
    # ... and A holds the output layer (Gemma's tied embeddings: over llama.cpp's 10 MiB hash threshold),
    # which it read from that file: nothing came over the channel into its tensor cache.
    cached = [p.name for p in rpc_cache.iterdir() if len(p.name) == 16]
    assert cached == [], cached
    assert [p.name for p in (rpc_cache / "index").iterdir()], "rpc-server indexed no store file"
