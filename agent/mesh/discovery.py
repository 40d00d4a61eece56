"""DNS-SD over mDNS (``_hearth._tcp.local.``) with python-zeroconf: announce this node and browse for peers.

The TXT record carries only public facts (node id, protocol version, API port, mesh port, key
fingerprint); the SRV port stays the API's, for browsers and apps. What a browser finds is a *candidate*,
never a peer: the mesh service routes to it only after a hello over the household channel (mesh port).
The AsyncZeroconf instance is the mesh service's (one per node); this class only registers and browses.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from collections.abc import Callable
from dataclasses import dataclass

from zeroconf import IPVersion, ServiceStateChange
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from . import PROTOCOL_VERSION, SERVICE_TYPE

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Candidate:
    """A node announced over mDNS: where to say hello, and what it claims (to be proven)."""

    instance: str
    host: str
    """The best of its announced IPv4 addresses that are not ours (see rank_addresses)."""
    port: int
    """Its mesh port (the household channel), from TXT."""
    node: str
    fingerprint: str
    version: int


def local_interfaces() -> list[tuple[str, int]]:
    """(address, prefix length) of every non-loopback IPv4 address on this machine, now."""
    import ifaddr  # a zeroconf dependency

    out = []
    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            if isinstance(ip.ip, str) and not ipaddress.ip_address(ip.ip).is_loopback:
                out.append((ip.ip, int(ip.network_prefix)))
    return out


def local_addresses(bind: str = "0.0.0.0") -> list[str]:
    """IPv4 addresses to announce: *bind* itself when it names one, else every non-loopback address."""
    if bind not in ("", "0.0.0.0", "::"):
        return [bind]
    return [a for a, _ in local_interfaces()]


def rank_addresses(announced: list[str], local: list[tuple[str, int]]) -> tuple[str, ...]:
    """A peer's announced addresses in the order to try them; never one of our own.

    A node may announce addresses that are not reachable from here, or that are ours too: two VMs behind
    qemu's user network are both 10.0.2.15, two PCs running Docker are both 172.17.0.1. Such an address
    would lead back to this node, so it is dropped. Then an address on a subnet we share comes first (a
    routable one before a link-local 169.254/16 one, which every link shares), then the rest as announced.
    """
    own = {a for a, _ in local}
    nets = [ipaddress.ip_network(f"{a}/{p}", strict=False) for a, p in local]

    def rank(a: str) -> int:
        ip = ipaddress.ip_address(a)
        if any(ip in n for n in nets):
            return 1 if ip.is_link_local else 0
        return 2

    return tuple(sorted((a for a in dict.fromkeys(announced) if a not in own), key=rank))


def txt_record(node: str, api_port: int, fingerprint: str, mesh_port: int) -> dict[str, str]:
    """The public TXT properties of a node (nothing secret)."""
    return {"node": node, "v": str(PROTOCOL_VERSION), "port": str(api_port), "mesh": str(mesh_port), "fp": fingerprint}


class Discovery:
    """Registers this node as ``<name>._hearth._tcp.local.`` and reports candidates found or gone."""

    def __init__(self, zc: AsyncZeroconf, name: str, node: str, api_port: int, fingerprint: str,
                 addresses: list[str], on_found: Callable[[Candidate], None],
                 on_gone: Callable[[str], None], mesh_port: int = 0) -> None:
        self.zc = zc
        self.name = name
        self.node = node
        self.on_found = on_found
        self.on_gone = on_gone
        self.info = AsyncServiceInfo(
            SERVICE_TYPE, f"{name}.{SERVICE_TYPE}", port=api_port, properties=txt_record(node, api_port, fingerprint, mesh_port),
            server=f"{name}.local.", addresses=[socket.inet_aton(a) for a in addresses])
        self._browser: AsyncServiceBrowser | None = None
        self._tasks: set[asyncio.Task[None]] = set()  # strong references, or the loop may drop them

    @property
    def addresses(self) -> list[str]:
        """The addresses this node announces."""
        return list(self.info.parsed_addresses())

    async def start(self) -> None:
        """Announce this node and start browsing."""
        await self.zc.async_register_service(self.info, allow_name_change=True)
        self._browser = AsyncServiceBrowser(self.zc.zeroconf, SERVICE_TYPE, handlers=[self._changed])
        log.info("announced %s on mDNS (%s)", self.info.name, ", ".join(self.info.parsed_addresses()))

    async def stop(self) -> None:
        """Stop browsing and unregister (mDNS goodbye), so browsers forget this node at once."""
        if self._browser is not None:
            await self._browser.async_cancel()
            self._browser = None
        for task in list(self._tasks):
            task.cancel()
        try:
            await asyncio.wait_for(self.zc.async_unregister_service(self.info), 3.0)
        except Exception as e:  # shutdown must go on
            log.debug("mDNS unregister: %s", e)

    def _changed(self, zeroconf: object, service_type: str, name: str, state_change: ServiceStateChange) -> None:
        if name == self.info.name:
            return
        if state_change is ServiceStateChange.Removed:
            self.on_gone(name)
            return
        task = asyncio.ensure_future(self._resolve(name))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _resolve(self, name: str) -> None:
        info = AsyncServiceInfo(SERVICE_TYPE, name)
        if not await info.async_request(self.zc.zeroconf, 3000):
            log.debug("mDNS: %s did not resolve", name)
            return
        props = {k.decode(errors="replace"): (v or b"").decode(errors="replace") for k, v in info.properties.items()}
        addresses = info.parsed_addresses(IPVersion.V4Only)
        if not addresses or not info.port:
            return
        try:
            version = int(props.get("v", "0"))
        except ValueError:
            version = 0
        if props.get("node") == self.node:
            return
        if version < PROTOCOL_VERSION or not props.get("mesh", "").isdigit():
            log.info("mDNS: %s speaks mesh protocol %d, this node %d (no household channel): update it",
                     name, version, PROTOCOL_VERSION)
            return
        hosts = rank_addresses(addresses, local_interfaces())
        if not hosts:
            log.debug("mDNS: %s announced only addresses of this node (%s)", name, ", ".join(addresses))
            return
        self.on_found(Candidate(name, hosts[0], int(props["mesh"]), props.get("node", ""), props.get("fp", ""), version))
