"""Apply a validated config under a root directory: the one set-up path the wizard, presets and CLI share.

``steps()`` lists what will be done, each step idempotent and each file written atomically, so a crash
halfway leaves every file either old or new and no "configured" marker (written last): the next boot
runs the wizard again. ``apply()`` runs them all.
"""

from __future__ import annotations

import ipaddress
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .. import config as configmod
from ..config import Config
from ..errors import ConfigError, HearthError
from ..fsutil import atomic_write
from . import accounts, network

log = logging.getLogger(__name__)

CONFIG_PATH = Path("etc/hearth/hearth.yaml")
CONFIGURED = "configured"
"""The marker under the state directory (/var/lib/hearth/configured) that ends first boot."""
SSH_UNIT = "ssh.service"
SSH_WANTS = Path("etc/systemd/system/multi-user.target.wants") / SSH_UNIT
SSH_UNIT_PATH = Path("/usr/lib/systemd/system") / SSH_UNIT


class SetupError(HearthError):
    """A set-up step failed; the message says which and the hint what to do."""


@dataclass(frozen=True)
class Step:
    """One named step of applying a config."""

    name: str
    run: Callable[[], str]
    """Does the step; returns a short result ("written", "unchanged", "joined household 1a2b...")."""


def under(root: Path, path: Path | str) -> Path:
    """*path* (absolute or relative) inside *root*."""
    return root / Path(path).relative_to("/") if Path(path).is_absolute() else root / path


def marker_path(cfg: Config, root: Path = Path("/")) -> Path:
    """Where the configured marker lives under *root*."""
    return under(root, cfg.state.dir) / CONFIGURED


def is_configured(cfg: Config | None = None, root: Path = Path("/")) -> bool:
    """Whether this node has been set up (the marker exists)."""
    return marker_path(cfg or Config(), root).exists()


def validate(cfg: Config) -> list[str]:
    """What is wrong across settings (each setting's own check already ran when it was parsed)."""
    problems = []
    net = cfg.network
    if net.mode == "static":
        if not net.address:
            problems.append("network.address is needed for a static address (e.g. 192.168.1.20/24)")
        if not net.interface:
            problems.append("network.interface is needed for a static address (e.g. eth0)")
        if net.gateway and net.address:
            if ipaddress.ip_address(net.gateway) not in ipaddress.ip_interface(net.address).network:
                problems.append(f"network.gateway {net.gateway} is not in the network of {net.address}")
    if net.wifi_passphrase and not net.wifi_ssid:
        problems.append("network.wifi_passphrase is set but network.wifi_ssid (the network's name) is not")
    if cfg.household.mode == "join":
        if not cfg.household.join_code:
            problems.append("household.join_code is needed to join a household ('hearth household invite' on a member)")
    if cfg.household.join_code:
        from ..mesh import household

        try:
            household.verify_code(cfg.household.join_code)
        except HearthError as e:
            problems.append(f"household.join_code: {e.message}")
    if cfg.admin.password and len(cfg.admin.password) < 8:
        problems.append("admin.password needs at least 8 characters")
    return problems


def public_config(cfg: Config) -> Config:
    """*cfg* with every secret emptied: what hearth.yaml may hold."""
    return cfg.replace(**{row.key: "" for row in configmod.SETTINGS if row.secret})


def wifi_interface(cfg: Config, sys_net: Path = Path("/sys/class/net")) -> str:
    """The wireless interface Wi-Fi settings are for: network.interface if wireless, else the first one."""
    wireless = [i.name for i in network.interfaces(sys_net) if i.wireless]
    if cfg.network.interface in wireless:
        return cfg.network.interface
    return wireless[0] if wireless else "wlan0"


def steps(cfg: Config, root: Path = Path("/"), *, model_file: Path | None = None,
          wifi_iface: str | None = None) -> list[Step]:
    """The steps that apply *cfg* under *root*, in order; the configured marker is always last."""
    problems = validate(cfg)
    if problems:
        raise ConfigError(problems[0], hint="fix it in the wizard or in hearth.yaml" if len(problems) == 1
                          else f"and {len(problems) - 1} more: " + "; ".join(problems[1:]))
    root = Path(root)
    iface = wifi_iface or (wifi_interface(cfg) if cfg.network.wifi_ssid else None)
    state = {"cfg": cfg}

    def settings_file() -> str:
        out = public_config(state["cfg"])
        text = configmod.dump(out)
        path = under(root, CONFIG_PATH)
        if path.exists() and path.read_text(encoding="utf-8") == text:
            return "unchanged"
        atomic_write(path, text, mode=0o644)
        return f"wrote {CONFIG_PATH}"

    def model() -> str:
        if model_file is None:
            return f"model: {cfg.model.name}"
        name = _import_model(model_file, under(root, cfg.models_dir))
        state["cfg"] = state["cfg"].replace(**{"model.name": name})
        return f"imported {name}"

    return [
        Step("Hostname", lambda: write_hostname(root, cfg)),
        Step("Keyboard layout", lambda: write_keymap(root, cfg.console.keymap)),
        Step("Network", lambda: write_network(root, cfg, iface)),
        Step("Admin account", lambda: accounts.set_admin(root, cfg.admin.password, cfg.admin.password_hash)),
        Step("Page sign-in", lambda: page_password(root, cfg)),
        Step("SSH", lambda: write_ssh(root, cfg.admin.ssh_key)),
        Step("Household", lambda: apply_household(root, cfg)),
        Step("Model", model),
        Step("Settings file", settings_file),
        Step("Finish", lambda: write_marker(root, cfg)),
    ]


def apply(cfg: Config, root: Path = Path("/"), *, model_file: Path | None = None, wifi_iface: str | None = None,
          progress: Callable[[str, str], None] | None = None) -> list[tuple[str, str]]:
    """Apply *cfg* under *root*; returns (step, result) pairs. Raises SetupError naming the failed step."""
    done = []
    for step in steps(cfg, root, model_file=model_file, wifi_iface=wifi_iface):
        if progress:
            progress(step.name, "running")
        result = run_step(step)
        done.append((step.name, result))
        if progress:
            progress(step.name, result)
    return done


def page_password(root: Path, cfg: Config) -> str:
    """Give the agent (which cannot read /etc/shadow) the admin password hash for the household page's sign-in."""
    from ..page import signin

    return signin.copy_from_shadow(root, under(root, cfg.state.dir))


def run_step(step: Step) -> str:
    """Run one step, turning an unexpected OSError into a SetupError that says what to do."""
    try:
        return step.run()
    except HearthError:
        raise
    except OSError as e:
        raise SetupError(f"{step.name}: {e.strerror or e} ({e.filename or ''})".replace(" ()", ""),
                         hint="is the disk full or read-only? Check 'df -h' and 'journalctl -b', then retry") from e


# --- the steps ------------------------------------------------------------------------------------


def _write_if_changed(path: Path, text: str, mode: int = 0o644) -> bool:
    try:
        if path.read_text(encoding="utf-8") == text and (path.stat().st_mode & 0o777) == mode:
            return False
    except (OSError, UnicodeDecodeError):
        pass
    atomic_write(path, text, mode=mode)
    return True


def node_name(cfg: Config, root: Path = Path("/")) -> str:
    """The node's hostname: node.name, or hearth-xxxx from the machine id."""
    return cfg.node.name or default_hostname(root)


def default_hostname(root: Path = Path("/")) -> str:
    """hearth-xxxx, the first four hex digits of /etc/machine-id (hearth-node when there is none yet)."""
    try:
        mid = under(root, "/etc/machine-id").read_text().strip()
    except OSError:
        mid = ""
    return f"hearth-{mid[:4]}" if len(mid) >= 4 and mid != "uninitialized" else "hearth-node"


def write_hostname(root: Path, cfg: Config) -> str:
    """/etc/hostname and the 127.0.1.1 line of /etc/hosts."""
    name = node_name(cfg, root)
    changed = _write_if_changed(under(root, "/etc/hostname"), name + "\n")
    hosts = under(root, "/etc/hosts")
    try:
        lines = hosts.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        lines = ["127.0.0.1\tlocalhost", "::1\t\tlocalhost ip6-localhost ip6-loopback"]
    lines = [ln for ln in lines if not ln.startswith("127.0.1.1")]
    lines.insert(1 if lines else 0, f"127.0.1.1\t{name}")
    changed |= _write_if_changed(hosts, "\n".join(lines) + "\n")
    if root.resolve() == Path("/"):
        _set_running_hostname(name)
    return f"{name}" + ("" if changed else " (unchanged)")


def _set_running_hostname(name: str) -> None:
    """Rename the running system too, so the console, DHCP and mDNS use the name before any reboot."""
    import socket

    try:
        if socket.gethostname() != name:
            socket.sethostname(name)
    except (OSError, AttributeError) as e:  # not root, or a sandbox without the UTS namespace right
        log.warning("cannot set the running hostname to %s: %s (it applies at next boot)", name, e)


def write_keymap(root: Path, keymap: str) -> str:
    """/etc/vconsole.conf with KEYMAP=, keeping its other lines (FONT=...)."""
    path = under(root, "/etc/vconsole.conf")
    try:
        lines = [ln for ln in path.read_text(encoding="utf-8").splitlines() if not ln.startswith("KEYMAP=")]
    except FileNotFoundError:
        lines = []
    _write_if_changed(path, "\n".join([f"KEYMAP={keymap}", *lines]) + "\n")
    return keymap


def write_network(root: Path, cfg: Config, wifi_iface: str | None) -> str:
    """systemd-networkd .network files and, for Wi-Fi, wpa_supplicant-<iface>.conf (0600) enabled."""
    net = cfg.network
    netdir = under(root, "/" + str(network.NETWORK_DIR))
    files = network.network_files(net, wifi_iface)
    for name, text in files.items():
        _write_if_changed(netdir / name, text)
    # Files we wrote for an earlier answer (another interface) must not linger and fight the new ones.
    for old in netdir.glob("*-hearth-*.network") if netdir.exists() else []:
        if old.name not in files:
            old.unlink()
    wpadir = under(root, "/" + str(network.WPA_DIR))
    wants = under(root, "/etc/systemd/system/multi-user.target.wants")
    for old in wpadir.glob("wpa_supplicant-*.conf") if wpadir.exists() else []:
        if not (net.wifi_ssid and old.name == f"wpa_supplicant-{wifi_iface}.conf"):
            old.unlink()
    for old in wants.glob("wpa_supplicant@*.service") if wants.exists() else []:
        if not (net.wifi_ssid and old.name == f"wpa_supplicant@{wifi_iface}.service"):
            old.unlink()
    if net.wifi_ssid and wifi_iface:
        _write_if_changed(wpadir / f"wpa_supplicant-{wifi_iface}.conf",
                          network.wpa_supplicant_conf(net.wifi_ssid, net.wifi_passphrase), mode=0o600)
        _symlink(wants / f"wpa_supplicant@{wifi_iface}.service", Path("/usr/lib/systemd/system/wpa_supplicant@.service"))
    what = f"static {net.address} on {net.interface}" if net.mode == "static" else "DHCP"
    return what + (f", Wi-Fi {net.wifi_ssid!r} on {wifi_iface}" if net.wifi_ssid else "")


def _symlink(link: Path, target: Path) -> None:
    """Create *link* -> *target* atomically (a systemctl-enable equivalent that works on an offline root)."""
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_symlink() and os.readlink(link) == str(target):
        return
    tmp = link.with_name(f".{link.name}.tmp")
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    tmp.symlink_to(target)
    os.replace(tmp, link)


def write_ssh(root: Path, key: str) -> str:
    """authorized_keys (0600) for admin and sshd enabled, only with a key; without one SSH is off."""
    home = accounts.home_of(root)
    auth = home / ".ssh" / "authorized_keys"
    wants = under(root, "/" + str(SSH_WANTS))
    if not key:
        if wants.is_symlink():
            wants.unlink()
        if auth.exists():
            auth.unlink()
        return "off (no key given)"
    auth.parent.mkdir(parents=True, exist_ok=True)
    os.chmod(auth.parent, 0o700)
    _write_if_changed(auth, key.strip() + "\n", mode=0o600)
    accounts.chown_admin(root, auth.parent, auth)
    _symlink(wants, SSH_UNIT_PATH)
    return "on, key for admin"


def apply_household(root: Path, cfg: Config) -> str:
    """Create or join the household through the mesh library (<state>/household.json, 0600)."""
    from ..mesh import household

    state_dir = under(root, cfg.state.dir)
    code = cfg.household.join_code
    current = household.load(state_dir)
    if code:
        secret = household.verify_code(code)
        if current is not None and current.secret == secret:
            return f"household {current.id} (unchanged)"
        joined = household.join(state_dir, code)
        verb = "created" if cfg.household.mode == "create" else "joined"
        return f"{verb} household {joined.id}"
    if current is not None:
        return f"household {current.id} (unchanged)"
    made = household.create(state_dir)
    return f"created household {made.id}"


def write_marker(root: Path, cfg: Config) -> str:
    """The configured marker, last: its presence ends first boot."""
    _write_if_changed(marker_path(cfg, root), "configured by hearth setup\n")
    return "configured"


def _import_model(path: Path, store_dir: Path) -> str:
    """Copy a GGUF (from a USB drive) into the model store, verified, through hearth.models; its name to serve."""
    from ..models.store import Store

    if store_dir.exists() and any(m.path.name == path.name for m in Store(store_dir).list()):
        return path.stem  # imported on an earlier run
    return Store(store_dir).import_file(path).name
