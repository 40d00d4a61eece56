"""What the person has answered so far: one mutable record the screens fill in and the Review applies.

Going back never loses anything: each screen reads its fields from here when it opens and writes
them back when it is left, in either direction.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hearth.config import Config


@dataclass
class Answers:
    """The wizard's answers, starting from defaults or an invalid preset's good values."""

    keymap: str = "us"
    hostname: str = ""
    net_mode: str = "dhcp"
    """'dhcp', 'static' or 'wifi'."""
    interface: str = ""
    address: str = ""
    gateway: str = ""
    dns: str = ""
    wifi_ssid: str = ""
    wifi_passphrase: str = ""
    household_mode: str = "create"
    new_code: str = ""
    """The code of the household this node will create (made once, shown on the Household screen)."""
    join_code: str = ""
    model: str = ""
    model_file: Path | None = None
    password: str = ""
    confirm: str = ""
    ssh_key: str = ""
    base: Config = field(default_factory=Config)
    """Settings the wizard does not ask about (from a preset), kept as they were."""

    @classmethod
    def from_prefill(cls, prefill: dict[str, Any]) -> Answers:
        """Answers from an invalid preset's good values (dotted keys), secrets included."""
        from hearth import config

        base: dict[str, dict[str, Any]] = {}
        for key, value in prefill.items():
            section, _, name = key.partition(".")
            base.setdefault(section, {})[name] = list(value) if isinstance(value, tuple) else value
        try:
            cfg = config.from_dict(base)
        except Exception:  # prefill values are individually valid; a clash is no reason to lose the rest
            cfg = Config()
        net = cfg.network
        mode = "wifi" if net.wifi_ssid else net.mode
        return cls(keymap=cfg.console.keymap, hostname=cfg.node.name, net_mode=mode, interface=net.interface,
                   address=net.address, gateway=net.gateway, dns=" ".join(net.dns), wifi_ssid=net.wifi_ssid,
                   wifi_passphrase=net.wifi_passphrase, household_mode=cfg.household.mode,
                   join_code=cfg.household.join_code, model="" if cfg.model.name == "auto" else cfg.model.name,
                   password=cfg.admin.password, confirm=cfg.admin.password, ssh_key=cfg.admin.ssh_key, base=cfg)

    def to_config(self) -> Config:
        """The config these answers make (secrets included; apply keeps them out of hearth.yaml)."""
        static = self.net_mode == "static"
        code = self.new_code if self.household_mode == "create" else self.join_code
        return self.base.replace(**{
            "console.keymap": self.keymap,
            "node.name": self.hostname,
            "network.mode": "static" if static else "dhcp",
            "network.interface": self.interface if static else "",
            "network.address": self.address if static else "",
            "network.gateway": self.gateway if static else "",
            "network.dns": self.dns.replace(",", " ").split() if static else [],
            "network.wifi_ssid": self.wifi_ssid if self.net_mode == "wifi" else "",
            "network.wifi_passphrase": self.wifi_passphrase if self.net_mode == "wifi" else "",
            "household.mode": self.household_mode,
            "household.join_code": code,
            "model.name": self.model or "auto",
            "admin.password": self.password,
            "admin.ssh_key": self.ssh_key.strip(),
        })
