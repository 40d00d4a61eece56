"""Network namespaces on a Linux bridge, and real Hearth agents running in them (tests and bench/mesh.py).

Every test run gets its own bridge (hb<random>) in the root namespace, a random 10.213.N.0/24 subnet and
namespaces hn<random><i>, each with a veth on the bridge and a multicast route (224.0.0.0/4), so mDNS
really crosses the bridge. Everything is removed at the end, even when a test fails.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
PYTHON = sys.executable
PORT = 8080
MESH_PORT = 8081


def need_netns() -> None:
    """Skip (with the reason) where namespaces cannot be made."""
    if os.geteuid() != 0:
        pytest.skip("namespace tests need root (ip netns)")
    if not shutil.which("ip"):
        pytest.skip("namespace tests need iproute2's 'ip'")


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run ``ip ARGS``."""
    return subprocess.run(["ip", *args], check=check, capture_output=True, text=True)


@dataclass
class Namespace:
    """One namespace on the LAN."""

    name: str
    address: str
    multicast: bool
    cidr: str = ""


class Lan:
    """A bridge with namespaces on it; close() removes all of it."""

    def __init__(self) -> None:
        self.tag = secrets.token_hex(3)
        self.bridge = f"hb{self.tag}"
        self.net = f"10.213.{secrets.randbelow(250) + 1}"
        self.namespaces: list[Namespace] = []
        ip("link", "add", self.bridge, "type", "bridge", "mcast_snooping", "0")
        ip("addr", "add", f"{self.net}.254/24", "dev", self.bridge)
        ip("link", "set", self.bridge, "up")

    def add(self, multicast: bool = True, address: str | None = None, now: bool = True) -> Namespace:
        """A new namespace on the bridge; without multicast it has no route and no flag.

        *address* (CIDR) replaces the subnet's; with *now* False it is only given later (give_address),
        as a DHCP lease or an IPv4 link-local claim arrives after the agent has started."""
        i = len(self.namespaces) + 1
        cidr = address or f"{self.net}.{i}/24"
        ns = Namespace(f"hn{self.tag}{i}", cidr.split("/")[0], multicast)
        ns.cidr = cidr
        self.namespaces.append(ns)
        host_end, ns_end = f"hv{self.tag}{i}", f"hp{self.tag}{i}"
        ip("netns", "add", ns.name)
        ip("link", "add", host_end, "type", "veth", "peer", "name", ns_end)
        ip("link", "set", ns_end, "netns", ns.name)
        ip("link", "set", host_end, "master", self.bridge, "up")
        ip("-n", ns.name, "link", "set", "lo", "up")
        ip("-n", ns.name, "link", "set", ns_end, "name", "eth0")
        if now:
            self.give_address(ns)
        ip("-n", ns.name, "link", "set", "eth0", "multicast", "on" if multicast else "off", "up")
        if multicast:
            ip("-n", ns.name, "route", "add", "224.0.0.0/4", "dev", "eth0")
        return ns

    @staticmethod
    def give_address(ns: Namespace) -> None:
        """Put the namespace's LAN address on its eth0."""
        ip("-n", ns.name, "addr", "add", ns.cidr, "dev", "eth0")

    @staticmethod
    def add_dummy(ns: Namespace, cidr: str, name: str = "usernet") -> None:
        """A second interface that leads nowhere, with *cidr* on it (say qemu's 10.0.2.15 on every VM).

        A veth pair with both ends in the namespace (this kernel may lack the dummy module)."""
        ip("-n", ns.name, "link", "add", name, "type", "veth", "peer", "name", f"{name}-end")
        ip("-n", ns.name, "addr", "add", cidr, "dev", name)
        ip("-n", ns.name, "link", "set", f"{name}-end", "up")
        ip("-n", ns.name, "link", "set", name, "up")

    def close(self) -> None:
        """End every process still in the namespaces, remove them (their veths go with them) and the bridge.

        A namespace is to its processes what a systemd unit is to its cgroup: a node killed in a test (a
        pulled plug), a program a failed test never stopped, all end with it. ``ip netns del`` alone would
        leave them running, detached, in a namespace nobody can name any more."""
        for ns in self.namespaces:
            kill_namespace(ns)
            ip("netns", "del", ns.name, check=False)
        ip("link", "del", self.bridge, check=False)


def kill_namespace(ns: Namespace, timeout: float = 5.0) -> None:
    """SIGKILL every process in *ns* and wait (up to *timeout* s) until none is left running."""
    deadline = time.monotonic() + timeout
    while True:
        pids = [int(p) for p in ip("netns", "pids", ns.name, check=False).stdout.split()]
        running = [p for p in pids if _running(p)]
        if not running or time.monotonic() > deadline:
            return
        for pid in running:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.05)


def _running(pid: int) -> bool:
    """Not yet a zombie (a killed process stays listed until its parent reaps it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@dataclass
class Agent:
    """A Hearth node running in a namespace."""

    ns: Namespace
    name: str
    state: Path
    secret: bytes
    model: str = "none"
    peers: tuple[str, ...] = ()
    discovery: bool = True
    threads: int = 1
    store: tuple[Path, ...] = ()
    """GGUF files linked into its model store before it starts."""
    settings: dict[str, dict[str, Any]] = field(default_factory=dict)
    """More settings by section (say {"pool": {"max_ram_mib": 300}}), over the ones above."""
    proc: subprocess.Popen[bytes] | None = None
    log: Path = field(init=False)

    def __post_init__(self) -> None:
        self.log = self.state / "agent.log"

    @property
    def url(self) -> str:
        """The node's API base URL on the LAN."""
        return f"http://{self.ns.address}:{PORT}"

    @property
    def mesh_url(self) -> str:
        """The node's household channel (mutual TLS) on the LAN."""
        return f"https://{self.ns.address}:{MESH_PORT}"

    @property
    def config_path(self) -> Path:
        """Its hearth.yaml."""
        return self.state / "hearth.yaml"

    def write_config(self) -> None:
        """Config and household for this node."""
        from hearth import config as config_mod
        from hearth.mesh import household

        self.state.mkdir(parents=True, exist_ok=True)
        data: dict[str, dict[str, Any]] = {
            "node": {"name": self.name}, "api": {"host": "0.0.0.0", "port": PORT},
            "state": {"dir": str(self.state)},
            "model": {"name": self.model, "threads": self.threads, "context": 1024, "chat_format": "gemma"},
            "mesh": {"port": MESH_PORT, "discovery": self.discovery, "peers": list(self.peers)},
            "log": {"level": "info"}}
        for section, values in self.settings.items():
            data.setdefault(section, {}).update(values)
        cfg = config_mod.from_dict(data)
        config_mod.save(cfg, self.config_path)
        models = self.state / "models"
        models.mkdir(exist_ok=True)
        for f in self.store:
            if not (models / f.name).exists():
                (models / f.name).symlink_to(f)
        household.join(self.state, household.code_for(self.secret), force=True)

    def command(self) -> list[str]:
        """How the node is started: the real agent, as systemd starts it."""
        return [PYTHON, "-m", "hearth", "--config", str(self.config_path), "agent"]

    def start(self) -> None:
        """Start the node in its namespace (output to agent.log)."""
        self.write_config()
        from hearth.serving.supervisor import die_with_parent

        env = dict(os.environ, PYTHONUNBUFFERED="1")
        with self.log.open("ab") as out:
            # `ip netns exec` execs the agent (same pid); it dies with the test run, however that ends, and its
            # own llama-server and rpc-server die with it.
            self.proc = subprocess.Popen(["ip", "netns", "exec", self.ns.name, *self.command()], stdout=out,
                                         stderr=subprocess.STDOUT, env=env, cwd=ROOT, preexec_fn=die_with_parent())

    def kill(self) -> None:
        """SIGKILL: no goodbye, no clean shutdown (a pulled plug)."""
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def stop(self) -> None:
        """SIGTERM and wait; SIGKILL if it hangs."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()

    def key(self) -> bytes:
        """Its household signing key."""
        from hearth.mesh.auth import derive_key

        return derive_key(self.secret)

    def signed(self, method: str, path: str, body: bytes = b"", key: bytes | None = None, node: str = "tester",
               headers: dict[str, str] | None = None, timeout: float = 5.0) -> Any:
        """A signed request to this node's channel, as a member of its household (a certificate from the
        household CA) signing with *key* (the household's unless given)."""
        import httpx

        from hearth.mesh.client import signed_headers

        url = self.mesh_url + path
        h = headers if headers is not None else signed_headers(key or self.key(), node, method, url, body)
        return httpx.request(method, url, content=body, headers=h, timeout=timeout, trust_env=False,
                             verify=member_context(self.secret))

    def local_get(self, path: str) -> dict[str, Any]:
        """GET *path* from its API on its own loopback (no key needed there), from inside its namespace; {}
        when it does not answer with JSON (not up yet)."""
        code = f"import httpx; print(httpx.get('http://127.0.0.1:{PORT}{path}', timeout=5).text)"
        res = run_in(self.ns, PYTHON, "-c", code, timeout=30)
        try:
            return dict(json.loads(res.stdout))
        except ValueError:
            return {}

    def view(self) -> dict[str, Any]:
        """Its /mesh/v1/peers answer."""
        resp = self.signed("GET", "/mesh/v1/peers")
        resp.raise_for_status()
        return resp.json()

    def peer_names(self) -> set[str]:
        """Names of the peers it routes to now."""
        try:
            return {p["name"] for p in self.view()["peers"]}
        except Exception:
            return set()

    def wait_up(self, timeout: float = 120.0) -> None:
        """Until its channel answers a signed request and its API port answers (the channel opens first)."""
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc and self.proc.poll() is not None:
                raise AssertionError(f"{self.name} exited with {self.proc.returncode}:\n{self.log_text()[-3000:]}")
            with contextlib.suppress(Exception):
                if self.signed("GET", "/mesh/v1/state", timeout=1.0).status_code == 200:
                    httpx.get(self.url + "/health", timeout=1.0, trust_env=False)  # any answer: the API listens
                    return
            time.sleep(0.1)
        raise AssertionError(f"{self.name} did not come up:\n{self.log_text()[-3000:]}")

    def log_text(self) -> str:
        """Everything it logged."""
        return self.log.read_text(errors="replace") if self.log.exists() else ""


_CONTEXTS: dict[bytes, Any] = {}


def member_context(secret: bytes) -> Any:
    """A TLS client context of a member of *secret*'s household (the tests' own node key), made once."""
    if secret not in _CONTEXTS:
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        from hearth.mesh.household import Household
        from hearth.mesh.identity import Identity
        from hearth.mesh.tls import Credentials

        creds = Credentials.issue(Identity(Ed25519PrivateKey.generate()), Household(secret))
        _CONTEXTS[secret] = creds.context(server=False)
    return _CONTEXTS[secret]


def wait_for(cond: Any, timeout: float, interval: float = 0.05) -> float:
    """Seconds until cond() is true; AssertionError after *timeout*."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if cond():
            return time.monotonic() - start
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout} s")


def shape(ns: Namespace, rate: str | None) -> None:
    """Limit the namespace's outgoing rate (tbf), or remove the limit with None."""
    if rate is None:
        subprocess.run(["ip", "netns", "exec", ns.name, "tc", "qdisc", "del", "dev", "eth0", "root"], capture_output=True)
    else:
        subprocess.run(["ip", "netns", "exec", ns.name, "tc", "qdisc", "add", "dev", "eth0", "root", "tbf", "rate", rate,
                        "burst", "64kb", "latency", "200ms"], check=True, capture_output=True)


def run_in(ns: Namespace, *argv: str, timeout: float = 120.0, **kw: Any) -> subprocess.CompletedProcess[str]:
    """Run a command in a namespace."""
    return subprocess.run(["ip", "netns", "exec", ns.name, *argv], capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT, **kw)


def openai_stream(ns: Namespace, base_url: str, model: str, prompt: str, max_tokens: int = 24) -> dict[str, Any]:
    """Stream a chat completion with the official openai client from inside *ns* (loopback needs no key)."""
    code = f"""
import json, openai, time
c = openai.OpenAI(base_url={base_url + '/v1'!r}, api_key="none", max_retries=0, timeout=120)
t0 = time.monotonic(); chunks = []; first = None
for ch in c.chat.completions.create(model={model!r}, messages=[{{"role": "user", "content": {prompt!r}}}],
                                     max_tokens={max_tokens}, temperature=0, stream=True):
    if ch.choices and ch.choices[0].delta.content:
        first = first or time.monotonic() - t0
        chunks.append(ch.choices[0].delta.content)
print(json.dumps({{"chunks": chunks, "ttft": first, "total": time.monotonic() - t0}}))
"""
    res = run_in(ns, PYTHON, "-c", code)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


class ChanPeer:
    """tests/netns/chanpeer.py (one end of the household channel) running in a namespace."""

    def __init__(self, ns: Namespace, secret: bytes, *args: str, port: int = 8091) -> None:
        self.ns = ns
        self.port = port
        self.proc = subprocess.Popen(["ip", "netns", "exec", ns.name, PYTHON, str(ROOT / "tests" / "netns" / "chanpeer.py"),
                                      "--secret", secret.hex(), "--port", str(port), *args],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     cwd=ROOT)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise ChanPeerFailed(self.proc.stderr.read() if self.proc.stderr else "")
        self.ready: dict[str, Any] = json.loads(line)
        self.node: str = self.ready["node"]

    @property
    def address(self) -> str:
        """NODE=HOST:PORT, as another chanpeer's --peer takes it."""
        return f"{self.node}={self.ns.address}:{self.port}"

    def forward(self, spec: str) -> str:
        """The loopback address of the forward *spec* (NODE/SERVICE)."""
        return self.ready["forwards"][spec]

    def stats(self) -> dict[str, Any]:
        """Bytes relayed by its forwards, and what its sink saw."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write("stats\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def kill(self) -> None:
        """SIGKILL (no goodbye)."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)

    def stop(self) -> None:
        """End of input: a clean stop."""
        if self.proc.poll() is None:
            with contextlib.suppress(OSError):
                assert self.proc.stdin is not None
                self.proc.stdin.close()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()


class ChanPeerFailed(AssertionError):
    """chanpeer.py exited before it was ready (its stderr is the message)."""
