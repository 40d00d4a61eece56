"""Hearth's configuration: one table of settings, parsed from YAML into a frozen dataclass.

The dataclasses below *are* the settings table: every field carries its one-line help and its check in
its metadata, and ``SETTINGS`` (used by parsing, ``hearth config``, the docs and ``summary()``) is
derived from them. To add a setting, add a field to a section with ``setting(...)``; nothing else.
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import os
import re
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError
from .fsutil import atomic_write
from .mesh import DEFAULT_PORT as MESH_DEFAULT_PORT

DEFAULT_PATH = Path("/etc/hearth/hearth.yaml")
"""Where the agent and the CLI read the node's configuration unless told otherwise."""

Check = Callable[[Any], str | None]
"""A check returns None when a value is good, else what is wrong with it (a short phrase)."""


def setting(default: Any, help: str, check: Check | None = None, secret: bool = False) -> Any:
    """Declare one setting: its default, its one-line help, an optional check, whether it is secret."""
    meta = {"help": help, "check": check, "secret": secret}
    if isinstance(default, list | dict):
        raise TypeError("use a tuple for list settings; settings are frozen")
    return field(default=default, metadata=meta)


# --- checks ---------------------------------------------------------------------------------------

_HOSTNAME = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")


def check_hostname(value: str) -> str | None:
    """A hostname label: 1-63 of a-z, 0-9 and '-', not starting or ending with '-'."""
    if value == "":
        return None
    if not _HOSTNAME.match(value):
        return "must be 1-63 lowercase letters, digits or '-', not starting or ending with '-'"
    return None


def check_port(value: int) -> str | None:
    """A TCP port."""
    return None if 1 <= value <= 65535 else "must be a port number from 1 to 65535"


def in_range(lo: int, hi: int) -> Check:
    """A check that an integer lies in [lo, hi]."""

    def check(value: int) -> str | None:
        return None if lo <= value <= hi else f"must be from {lo} to {hi}"

    return check


def one_of(*choices: str) -> Check:
    """A check that a string is one of *choices*."""

    def check(value: str) -> str | None:
        return None if value in choices else "must be one of " + ", ".join(choices)

    return check


def check_address(value: str) -> str | None:
    """An IP address to bind to."""
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return "must be an IP address such as 0.0.0.0 or 127.0.0.1"
    return None


def check_peers(value: tuple[str, ...]) -> str | None:
    """Manual peers: host or IP, optionally with :port."""
    for peer in value:
        host, _, port = peer.rpartition(":") if peer.count(":") == 1 else (peer, "", "")
        if port and not (port.isdigit() and 1 <= int(port) <= 65535):
            return f"peer {peer!r} has a bad port"
        if not (host or peer).strip() or any(c.isspace() for c in peer):
            return f"peer {peer!r} is not a host name or address"
    return None


def check_ifname(value: str) -> str | None:
    """A network interface name (empty means every wired port)."""
    if value == "" or re.match(r"^[A-Za-z0-9_.:-]{1,15}$", value):
        return None
    return "must be an interface name such as eth0 or enp3s0 (1-15 letters, digits, '-', '_', '.')"


def check_cidr(value: str) -> str | None:
    """A static address with its prefix length, e.g. 192.168.1.20/24 (empty means none)."""
    if value == "":
        return None
    if "/" not in value:
        return "must include the prefix length, e.g. 192.168.1.20/24"
    try:
        iface = ipaddress.ip_interface(value)
    except ValueError:
        return "must be an address with prefix length, e.g. 192.168.1.20/24"
    if iface.ip == iface.network.network_address and iface.network.prefixlen < iface.max_prefixlen - 1:
        return "is the network's own address; pick a host address such as .20"
    return None


def check_optional_ip(value: str) -> str | None:
    """An IP address or nothing."""
    return None if value == "" else check_address(value)


def check_ips(value: tuple[str, ...]) -> str | None:
    """A list of IP addresses."""
    for item in value:
        if check_address(item):
            return f"{item!r} is not an IP address"
    return None


def check_passphrase(value: str) -> str | None:
    """A WPA passphrase: 8-63 printable ASCII characters (empty means an open network or no Wi-Fi)."""
    if value == "":
        return None
    if not 8 <= len(value) <= 63 or not all(32 <= ord(c) < 127 for c in value):
        return "must be 8 to 63 printable ASCII characters"
    return None


def check_password_hash(value: str) -> str | None:
    """A crypt(3) SHA-512 hash."""
    if value == "" or re.match(r"^\$6\$(rounds=\d+\$)?[./0-9A-Za-z]{1,16}\$[./0-9A-Za-z]{86}$", value):
        return None
    return "must be a SHA-512 crypt hash ($6$...), as 'openssl passwd -6' prints"


def check_ssh_key(value: str) -> str | None:
    """One SSH public key line (empty means SSH stays off)."""
    if value == "":
        return None
    parts = value.split()
    kinds = ("ssh-ed25519", "ssh-rsa", "ecdsa-sha2-", "sk-ssh-ed25519@openssh.com", "sk-ecdsa-sha2-")
    if len(parts) < 2 or not parts[0].startswith(kinds) or "\n" in value.strip():
        return "must be one public key line such as 'ssh-ed25519 AAAA... you@laptop'"
    return None


# --- the table --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NodeSettings:
    """Who this node is."""

    name: str = setting("", "Node name and hostname; empty means hearth-xxxx from the machine id.", check_hostname)


@dataclass(frozen=True)
class ApiSettings:
    """The OpenAI-compatible (and Ollama-style) HTTP API."""

    host: str = setting("0.0.0.0", "Address the API listens on.", check_address)
    port: int = setting(8080, "TCP port of the API.", check_port)
    open_loopback: bool = setting(True, "Let clients on this machine (loopback) call the API without a key.")
    max_body_bytes: int = setting(4 * 1024 * 1024, "Largest request body accepted, in bytes.", in_range(1024, 1 << 30))
    queue_depth: int = setting(8, "Requests that may wait per model before new ones get 429.", in_range(0, 10_000))


@dataclass(frozen=True)
class PageSettings:
    """The household page served at / on the API's port."""

    household_chat: bool = setting(False, "Let anyone on the LAN chat on the household page without signing in "
                                          "(the rest of the page still needs the admin password).")


@dataclass(frozen=True)
class StateSettings:
    """Where the node keeps what it must remember."""

    dir: Path = setting(Path("/var/lib/hearth"), "State directory: identity, keys, household, models.")
    models_dir: Path = setting(Path(""), "Model store; empty means <state.dir>/models.")


@dataclass(frozen=True)
class ModelSettings:
    """Which model this node serves and how."""

    name: str = setting("auto", "Catalogue name or GGUF file in the store to serve; 'auto' lets the profile pick; 'none' serves nothing.")
    context: int = setting(0, "Context length in tokens; 0 means the profile's.", in_range(0, 1 << 20))
    threads: int = setting(0, "CPU threads for generation; 0 means the profile's (physical cores).", in_range(0, 1024))
    gpu_layers: int = setting(-1, "Layers to offload to the GPU; -1 means as many as fit.", in_range(-1, 10_000))
    slots: int = setting(0, "Requests generated at once (llama-server slots, continuous batching); 0 means the profile's.",
                         in_range(0, 64))
    chat_format: str = setting("", "Chat template for GGUFs without one (gemma, chatml); empty means the GGUF's own.")
    max_ram_mib: int = setting(0, "Most RAM this node's own model may take, in MiB: the profile picks as for a machine "
                                  "with that much (a PC that is also someone's desktop); 0 means all that is free.",
                               in_range(0, 1 << 24))


@dataclass(frozen=True)
class MeshSettings:
    """The household mesh."""

    enabled: bool = setting(True, "Join the household mesh (needs a household secret).")
    port: int = setting(MESH_DEFAULT_PORT, "TCP port of the household channel (mutual TLS 1.3): all node-to-node traffic.",
                        check_port)
    discovery: bool = setting(True, "Find peers with DNS-SD over mDNS (_hearth._tcp).")
    peers: tuple[str, ...] = setting((), "Manual peers (host or IP[:mesh port]) for networks that drop multicast.",
                                     check_peers)


@dataclass(frozen=True)
class PoolSettings:
    """The household pool: one model across several nodes, through llama.cpp's RPC (README "Pooling")."""

    enabled: bool = setting(True, "Offer this node's spare memory to the household pool (an rpc-server on loopback, "
                                  "reached only through the mesh's channel).")
    max_ram_mib: int = setting(0, "Most RAM offered to the pool, in MiB; 0 means all that is left after this node's "
                                  "own model and pool.reserve_mib.", in_range(0, 1 << 24))
    max_vram_mib: int = setting(0, "Most VRAM offered per GPU, in MiB; 0 means all that is left after this node's "
                                   "own model and pool.reserve_mib.", in_range(0, 1 << 24))
    reserve_mib: int = setting(2048, "Memory kept out of the pool on top of this node's own model (its apps, "
                                     "its model's growth), in MiB.", in_range(0, 1 << 24))
    rpc_port: int = setting(50052, "Loopback port of this node's rpc-server (never reachable from the LAN).",
                            check_port)
    threads: int = setting(0, "CPU threads rpc-server computes pool work with; 0 means half the cores.",
                           in_range(0, 1024))
    nice: int = setting(10, "CPU priority of pool work (nice, 0-19): above 0, this node's own model comes first.",
                        in_range(0, 19))
    serve: tuple[str, ...] = setting((), "Models this node runs across the household pool (catalogue names or GGUF "
                                         "files in the store), besides its own; a named model too big for this "
                                         "node is pooled without being listed.")
    auto: bool = setting(True, "With model.name: auto, run the hardware class's preferred model across the household "
                               "pool when it does not fit this node alone but fits with what the peers offer; this "
                               "node keeps serving the best model that fits it alone besides.")


@dataclass(frozen=True)
class LogSettings:
    """Logging."""

    level: str = setting("info", "Log level.", one_of("debug", "info", "warning", "error"))


@dataclass(frozen=True)
class ConsoleSettings:
    """The local console."""

    keymap: str = setting("us", "Console keyboard layout (a kbd keymap name such as us, de, fr, uk).",
                          lambda v: None if re.match(r"^[A-Za-z0-9_.-]{1,40}$", v) else "must be a keymap name such as us or de")


@dataclass(frozen=True)
class NetworkSettings:
    """How the node reaches the LAN (written as systemd-networkd files by the wizard or a preset)."""

    interface: str = setting("", "Interface to configure; empty means DHCP on every wired port.", check_ifname)
    mode: str = setting("dhcp", "How the interface gets its address: dhcp or static.", one_of("dhcp", "static"))
    address: str = setting("", "Static address with prefix length, e.g. 192.168.1.20/24.", check_cidr)
    gateway: str = setting("", "Static default gateway, e.g. 192.168.1.1.", check_optional_ip)
    dns: tuple[str, ...] = setting((), "DNS servers for a static address.", check_ips)
    wifi_ssid: str = setting("", "Wi-Fi network name to join; empty means no Wi-Fi.")
    wifi_passphrase: str = setting("", "Wi-Fi passphrase; removed from a preset once applied.", check_passphrase, secret=True)


@dataclass(frozen=True)
class AdminSettings:
    """The console/SSH administrator account (user 'admin')."""

    password: str = setting("", "Admin password in clear (presets only): hashed on apply, then removed from the file.", secret=True)
    password_hash: str = setting("", "Admin password as a SHA-512 crypt hash ($6$..., 'openssl passwd -6').",
                                 check_password_hash, secret=True)
    ssh_key: str = setting("", "SSH public key for admin; SSH stays off without one.", check_ssh_key)


@dataclass(frozen=True)
class HouseholdSettings:
    """Which household this node belongs to."""

    mode: str = setting("create", "create a new household, or join one with a code from another node.",
                        one_of("create", "join"))
    join_code: str = setting("", "Join code from 'hearth household invite' on another node; removed from a preset once applied.",
                             secret=True)


def check_update_url(value: str) -> str | None:
    """Where releases are published: an http(s):// or file:// URL, or nothing."""
    if value == "" or re.match(r"^(https?|file)://\S+$", value):
        return None
    return "must be an http://, https:// or file:// URL (the folder holding SHA256SUMS)"


@dataclass(frozen=True)
class UpdateSettings:
    """A/B image updates (README, "Updates")."""

    url: str = setting("", "Folder URL where Hearth releases are published (SHA256SUMS, its .gpg, the files); empty: peers only.",
                       check_update_url)
    from_peers: bool = setting(True, "Fetch a release from a household peer that already has it before asking the URL.")


@dataclass(frozen=True)
class Config:
    """A node's whole configuration, as read from hearth.yaml (frozen)."""

    node: NodeSettings = field(default_factory=NodeSettings)
    api: ApiSettings = field(default_factory=ApiSettings)
    page: PageSettings = field(default_factory=PageSettings)
    state: StateSettings = field(default_factory=StateSettings)
    model: ModelSettings = field(default_factory=ModelSettings)
    mesh: MeshSettings = field(default_factory=MeshSettings)
    pool: PoolSettings = field(default_factory=PoolSettings)
    log: LogSettings = field(default_factory=LogSettings)
    console: ConsoleSettings = field(default_factory=ConsoleSettings)
    network: NetworkSettings = field(default_factory=NetworkSettings)
    admin: AdminSettings = field(default_factory=AdminSettings)
    household: HouseholdSettings = field(default_factory=HouseholdSettings)
    update: UpdateSettings = field(default_factory=UpdateSettings)

    @property
    def models_dir(self) -> Path:
        """The model store's directory."""
        return self.state.models_dir if str(self.state.models_dir) not in ("", ".") else self.state.dir / "models"

    def replace(self, **dotted: Any) -> Config:
        """A copy with settings changed by dotted key, e.g. ``replace(**{"api.port": 9000})``."""
        data = to_dict(self)
        for key, value in dotted.items():
            section, _, name = key.partition(".")
            data.setdefault(section, {})[name] = value
        return from_dict(data)


# --- derived table ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Setting:
    """One row of the settings table, derived from the dataclasses above."""

    key: str
    type: Any
    default: Any
    help: str
    check: Check | None
    secret: bool


def _sections() -> Iterator[tuple[str, type]]:
    hints = typing.get_type_hints(Config)
    for f in dataclasses.fields(Config):
        yield f.name, hints[f.name]


def _settings() -> list[Setting]:
    rows = []
    for section, cls in _sections():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            rows.append(
                Setting(f"{section}.{f.name}", hints[f.name], f.default, f.metadata["help"],
                        f.metadata["check"], f.metadata["secret"])
            )
    return rows


SETTINGS: list[Setting] = _settings()
"""Every setting, in file order: the single source of truth for parsing, docs and summary."""

_BY_KEY = {s.key: s for s in SETTINGS}


def _type_name(tp: Any) -> str:
    if tp is tuple[str, ...]:
        return "list of strings"
    return {int: "integer", bool: "true/false", str: "string", Path: "path"}.get(tp, str(tp))


def _coerce(row: Setting, value: Any, raw: str | None) -> Any:
    """Turn a YAML value into the setting's type or raise ValueError with what is wrong."""
    tp = row.type
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is str:
        if value is None:
            return ""
        if isinstance(value, str | int | float) and not isinstance(value, bool):
            # YAML reads `passphrase: 12345678` as a number; the text the person typed is what they meant.
            return raw if raw is not None else str(value)
    elif tp is Path:
        if isinstance(value, str):
            return Path(value)
        if value is None:
            return Path("")
    elif tp == tuple[str, ...]:
        if value is None:
            return ()
        if isinstance(value, list | tuple) and all(isinstance(v, str | int) and not isinstance(v, bool) for v in value):
            return tuple(str(v) for v in value)
    raise ValueError(f"must be a {_type_name(tp)}, got {value!r}")


def _suggest(key: str) -> str | None:
    close = difflib.get_close_matches(key, list(_BY_KEY), n=1)
    return f"did you mean '{close[0]}'?" if close else "see 'hearth config --list' for every setting"


def _build(values: dict[str, dict[str, Any]]) -> Config:
    sections = {}
    for section, cls in _sections():
        sections[section] = cls(**values.get(section, {}))
    return Config(**sections)


def from_dict(data: Any, source: str = "config") -> Config:
    """Build a Config from plain data (a preset, the wizard); raises ConfigError naming the bad key."""
    return _parse_mapping(data, lambda key: source)


def _parse_mapping(data: Any, where: Callable[[str], str], raws: dict[str, str | None] | None = None) -> Config:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where('')}: the file must be a mapping of sections (node:, api:, model: ...)",
                          hint="see 'hearth config --list'")
    values: dict[str, dict[str, Any]] = {}
    known = {s for s, _ in _sections()}
    for section, body in data.items():
        if str(section) not in known:
            close = difflib.get_close_matches(str(section), sorted(known), n=1)
            hint = f"did you mean '{close[0]}'?" if close else "sections are " + ", ".join(sorted(known))
            raise ConfigError(f"{where(str(section))}: unknown section '{section}'", hint=hint)
        if not isinstance(body, dict):
            raise ConfigError(f"{where(str(section))}: '{section}' must be a mapping of settings")
        for name, value in body.items():
            key = f"{section}.{name}"
            row = _BY_KEY.get(key)
            if row is None:
                raise ConfigError(f"{where(key)}: unknown setting '{key}'", hint=_suggest(key))
            try:
                coerced = _coerce(row, value, (raws or {}).get(key))
            except ValueError as e:
                raise ConfigError(f"{where(key)}: {key} {e}") from None
            problem = row.check(coerced) if row.check else None
            if problem:
                raise ConfigError(f"{where(key)}: {key} {problem}")
            values.setdefault(str(section), {})[str(name)] = coerced
    return _build(values)


def parse(text: str, source: str = "hearth.yaml") -> Config:
    """Parse YAML text; errors name the file, the line and the key."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{source}{line}: not valid YAML: {problem}", hint="check the indentation and colons") from None
    lines: dict[str, int] = {}
    raws: dict[str, str | None] = {}
    if isinstance(root, yaml.MappingNode):
        for knode, vnode in root.value:
            lines[str(knode.value)] = knode.start_mark.line + 1
            if isinstance(vnode, yaml.MappingNode):
                for k2, v2 in vnode.value:
                    key = f"{knode.value}.{k2.value}"
                    lines[key] = k2.start_mark.line + 1
                    raws[key] = v2.value if isinstance(v2, yaml.ScalarNode) and v2.value != "" else None

    def where(key: str) -> str:
        line = lines.get(key) or lines.get(key.partition(".")[0])
        return f"{source} line {line}" if line else source

    return _parse_mapping(data, where, raws)


def load(path: str | os.PathLike[str] | None = None) -> Config:
    """Read the node's config (``$HEARTH_CONFIG`` or /etc/hearth/hearth.yaml); a missing file means defaults."""
    p = Path(path) if path else Path(os.environ.get("HEARTH_CONFIG", DEFAULT_PATH))
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        return Config()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read {p}: {e}", hint="check the file's permissions and encoding") from None
    return parse(text, str(p))


def to_dict(config: Config, only_changed: bool = False) -> dict[str, dict[str, Any]]:
    """Plain data for YAML: paths as strings, tuples as lists; optionally only non-default values."""
    out: dict[str, dict[str, Any]] = {}
    for row in SETTINGS:
        section, _, name = row.key.partition(".")
        value = getattr(getattr(config, section), name)
        if only_changed and value == row.default:
            continue
        if isinstance(value, Path):
            value = "" if value == Path("") else str(value)
        elif isinstance(value, tuple):
            value = list(value)
        out.setdefault(section, {})[name] = value
    return out


def dump(config: Config) -> str:
    """YAML text for *config*, only the settings that differ from the defaults."""
    data = to_dict(config, only_changed=True)
    header = "# Hearth node configuration. Every setting: hearth config --list\n"
    return header + (yaml.safe_dump(data, sort_keys=False) if data else "{}\n")


def save(config: Config, path: str | os.PathLike[str], mode: int = 0o644) -> None:
    """Write *config* to *path* atomically."""
    atomic_write(path, dump(config), mode=mode)


def summary(config: Config) -> list[tuple[str, str, str]]:
    """(key, value, help) for every setting, secrets masked: for ``hearth config``."""
    rows = []
    flat = to_dict(config)
    for row in SETTINGS:
        section, _, name = row.key.partition(".")
        value = flat[section][name]
        shown = "********" if row.secret and value else ("[]" if value == [] else str(value))
        rows.append((row.key, shown, row.help))
    return rows
