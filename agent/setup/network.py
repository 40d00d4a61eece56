"""The node's network: what interfaces exist (for the wizard) and the systemd-networkd/Wi-Fi files to write.

Discovery reads /sys/class/net and ``ip -j addr``; a Wi-Fi scan asks ``iw``. Every probe returns what it
could find and never raises for a missing tool: the wizard shows what is there.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import logging
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from ..config import NetworkSettings

log = logging.getLogger(__name__)

NETWORK_DIR = Path("etc/systemd/network")
WPA_DIR = Path("etc/wpa_supplicant")
FILE_PREFIX = "10-hearth-"
"""Per-interface files sort before our wired catch-all (20-) and the image's defaults (80-*)."""


@dataclass(frozen=True)
class Interface:
    """One network interface as the wizard shows it."""

    name: str
    wireless: bool
    link: bool
    addresses: tuple[str, ...] = ()
    mac: str = ""

    @property
    def kind(self) -> str:
        """'wireless' or 'wired'."""
        return "wireless" if self.wireless else "wired"


def interfaces(sys_net: Path = Path("/sys/class/net")) -> list[Interface]:
    """Physical interfaces (not lo, bridges or virtual ones) with link state and IPv4 addresses."""
    addrs = _ip_addresses()
    found = []
    try:
        names = sorted(p.name for p in sys_net.iterdir())
    except OSError:
        return []
    for name in names:
        base = sys_net / name
        if name == "lo" or not (base / "device").exists():
            continue  # virtual: loopback, bridges, veths, ifb
        oper = _read(base / "operstate")
        carrier = _read(base / "carrier")
        found.append(Interface(name=name, wireless=(base / "wireless").exists() or (base / "phy80211").exists(),
                               link=oper == "up" or carrier == "1", addresses=tuple(addrs.get(name, ())),
                               mac=_read(base / "address")))
    return found


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def _ip_addresses() -> dict[str, list[str]]:
    """IPv4 addresses per interface from ``ip -j addr`` ({} when ip is missing)."""
    if not shutil.which("ip"):
        return {}
    try:
        out = subprocess.run(["ip", "-j", "addr"], capture_output=True, text=True, timeout=5, check=True).stdout
        data = json.loads(out)
    except (OSError, subprocess.SubprocessError, ValueError) as e:
        log.warning("ip -j addr failed: %s", e)
        return {}
    return parse_ip_json(data)


def parse_ip_json(data: list[dict]) -> dict[str, list[str]]:
    """{ifname: ["192.168.1.20/24", ...]} from ``ip -j addr`` output (IPv4 only: what people type)."""
    result: dict[str, list[str]] = {}
    for item in data:
        for a in item.get("addr_info", []):
            if a.get("family") == "inet":
                result.setdefault(item.get("ifname", "?"), []).append(f"{a['local']}/{a['prefixlen']}")
    return result


def primary_address(ifaces: list[Interface]) -> str | None:
    """The address to show people: the first IPv4 address of an interface with link."""
    for iface in sorted(ifaces, key=lambda i: (not i.link, i.wireless, i.name)):
        for addr in iface.addresses:
            return addr.split("/")[0]
    return None


def wifi_scan(iface: str, timeout: float = 15) -> list[str]:
    """SSIDs seen by *iface*, strongest first (``iw dev IFACE scan``; [] when iw is missing or fails)."""
    if not shutil.which("iw"):
        return []
    try:
        subprocess.run(["ip", "link", "set", iface, "up"], capture_output=True, timeout=5)
        out = subprocess.run(["iw", "dev", iface, "scan"], capture_output=True, text=True, timeout=timeout).stdout
    except (OSError, subprocess.SubprocessError) as e:
        log.warning("wifi scan on %s failed: %s", iface, e)
        return []
    return parse_iw_scan(out)


def parse_iw_scan(text: str) -> list[str]:
    """SSIDs from ``iw dev X scan`` output, by signal, strongest first, hidden ones left out."""
    seen: dict[str, float] = {}
    signal = -100.0
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("BSS "):
            signal = -100.0
        elif line.startswith("signal:"):
            m = re.search(r"(-?\d+(?:\.\d+)?)", line)
            signal = float(m.group(1)) if m else -100.0
        elif line.startswith("SSID:"):
            ssid = line[5:].strip()
            if ssid and "\\x00" not in ssid:
                seen[ssid] = max(seen.get(ssid, -1000.0), signal)
    return sorted(seen, key=lambda s: -seen[s])


# --- files ---------------------------------------------------------------------------------------


def wpa_psk(ssid: str, passphrase: str) -> str:
    """The WPA2 PSK (PBKDF2-SHA1, 4096 rounds): stored instead of the passphrase itself."""
    return hashlib.pbkdf2_hmac("sha1", passphrase.encode(), ssid.encode(), 4096, 32).hex()


def network_files(net: NetworkSettings, wifi_iface: str | None) -> dict[str, str]:
    """{file name under /etc/systemd/network: text} for *net*.

    A named interface gets its own file (static or DHCP); every other wired port keeps DHCP through a
    catch-all that sorts after it, so a second cable still works.
    """
    dhcp = ["DHCP=yes"]
    if net.mode == "static":
        chosen = [f"Address={net.address}"] + ([f"Gateway={net.gateway}"] if net.gateway else [])
        chosen += [f"DNS={d}" for d in net.dns]
    else:
        chosen = dhcp
    files = {"20-hearth-wired.network": _network("Type=ether\nKind=!*", dhcp)}
    if net.interface and net.interface != wifi_iface:
        files[f"{FILE_PREFIX}{net.interface}.network"] = _network(f"Name={net.interface}", chosen)
    if net.wifi_ssid and wifi_iface:
        body = chosen if net.interface == wifi_iface else dhcp
        files[f"{FILE_PREFIX}{wifi_iface}.network"] = _network(f"Name={wifi_iface}", body)
    return files


def _network(match: str, body: list[str]) -> str:
    head = "# Written by Hearth's first-boot set-up (hearth setup); edit with the wizard or hearth.yaml.\n"
    # MulticastDNS/LLMNR off: Hearth announces itself with its own mDNS responder (python-zeroconf).
    body = [*body, "IPv6AcceptRA=yes", "MulticastDNS=no", "LLMNR=no"]
    # Not "required for online": a node with one cable out must not hold the boot for two minutes.
    return head + f"[Match]\n{match}\n\n[Network]\n" + "\n".join(body) + "\n\n[Link]\nRequiredForOnline=no\n"


def wpa_supplicant_conf(ssid: str, passphrase: str) -> str:
    """A wpa_supplicant-<iface>.conf joining *ssid* (the PSK hashed, not the passphrase; open when none)."""
    quoted = ssid.replace("\\", "\\\\").replace('"', '\\"')
    key = f"    psk={wpa_psk(ssid, passphrase)}\n" if passphrase else "    key_mgmt=NONE\n"
    return ("# Written by Hearth's first-boot set-up.\nctrl_interface=DIR=/run/wpa_supplicant GROUP=netdev\n"
            "update_config=0\n\nnetwork={\n" + f'    ssid="{quoted}"\n' + key + "}\n")


def host_address(address: str) -> str:
    """'192.168.1.20' from '192.168.1.20/24'."""
    return str(ipaddress.ip_interface(address).ip)
