"""Network: each interface with its link and address; DHCP by default, or a fixed address, or Wi-Fi."""

from __future__ import annotations

import ipaddress

from textual import on
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widgets import Input, OptionList, Static
from textual.widgets.option_list import Option

from hearth.config import check_cidr, check_passphrase

from ..messages import NetworkFound
from .base import WizardScreen


class NetworkScreen(WizardScreen):
    """Shows the interfaces and asks how this node gets its address."""

    TITLE = "Network"

    def body(self) -> ComposeResult:
        """Interface table, the choice, and the static and Wi-Fi forms (shown when chosen)."""
        yield Static("Looking at the network ports...", id="ifaces", markup=False)
        yield OptionList(id="mode")
        with Vertical(id="static-form", classes="form"):
            yield Input(placeholder="address/prefix, e.g. 192.168.1.20/24", id="address")
            yield Input(placeholder="gateway, e.g. 192.168.1.1 (optional)", id="gateway")
            yield Input(placeholder="DNS servers, e.g. 192.168.1.1 1.1.1.1 (optional)", id="dns")
        with Vertical(id="wifi-form", classes="form"):
            yield OptionList(id="ssids")
            yield Input(placeholder="network name (SSID)", id="ssid")
            yield Input(placeholder="passphrase (8 to 63 characters)", password=True, id="passphrase")

    def load(self) -> None:
        """Fill the choice from what is known now; the NetworkFound message may bring more."""
        a = self.answers
        self.query_one("#address", Input).value = a.address
        self.query_one("#gateway", Input).value = a.gateway
        self.query_one("#dns", Input).value = a.dns
        self.query_one("#ssid", Input).value = a.wifi_ssid
        self.query_one("#passphrase", Input).value = a.wifi_passphrase
        self.show(self.wizard.network)
        self.query_one("#mode", OptionList).focus()

    def on_network_found(self, message: NetworkFound) -> None:
        """The interface probe finished while this screen was open."""
        self.show(message.view)

    def _wired(self) -> str:
        view = self.wizard.network
        wired = [i for i in getattr(view, "interfaces", []) if not i.wireless]
        linked = [i for i in wired if i.link] or wired
        return linked[0].name if linked else "eth0"

    def show(self, view: object) -> None:
        """Render the interfaces and offer the choices that make sense for them."""
        ifaces = list(getattr(view, "interfaces", []) or [])
        if view is None:
            return
        if ifaces:
            rows = [f"{'Port':<10} {'Kind':<9} {'Cable/link':<11} Address"]
            for i in ifaces:
                addr = ", ".join(i.addresses) or ("waiting for DHCP" if i.link else "-")
                rows.append(f"{i.name:<10} {i.kind:<9} {'up' if i.link else 'down':<11} {addr}")
            text = "\n".join(rows)
        else:
            text = "No network port found. Hearth still works on this PC alone; plug a cable in and choose DHCP."
        self.query_one("#ifaces", Static).update(text)
        mode = self.query_one("#mode", OptionList)
        mode.clear_options()
        mode.add_option(Option("Automatic address (DHCP) on every wired port  - recommended", id="dhcp"))
        mode.add_option(Option(f"Fixed address on {self.answers.interface or self._wired()}", id="static"))
        wifi = getattr(view, "wifi_iface", None)
        if wifi:
            mode.add_option(Option(f"Wi-Fi on {wifi}", id="wifi"))
        order = ["dhcp", "static"] + (["wifi"] if wifi else [])
        mode.highlighted = order.index(self.answers.net_mode) if self.answers.net_mode in order else 0
        ssids = self.query_one("#ssids", OptionList)
        ssids.clear_options()
        for s in getattr(view, "ssids", []) or []:
            ssids.add_option(Option(s, id=s))
        ssids.display = ssids.option_count > 0
        if ssids.option_count:
            known = [str(o.id) for o in ssids.options]
            ssids.highlighted = known.index(self.answers.wifi_ssid) if self.answers.wifi_ssid in known else 0
        self._show_form(self.answers.net_mode if self.answers.net_mode != "dhcp" else None)

    def _show_form(self, which: str | None) -> None:
        self.query_one("#static-form").display = which == "static"
        self.query_one("#wifi-form").display = which == "wifi"

    def save(self) -> None:
        """Remember every field, chosen or not."""
        a = self.answers
        a.address = self.query_one("#address", Input).value.strip()
        a.gateway = self.query_one("#gateway", Input).value.strip()
        a.dns = self.query_one("#dns", Input).value.strip()
        a.wifi_ssid = self.query_one("#ssid", Input).value.strip()
        a.wifi_passphrase = self.query_one("#passphrase", Input).value

    @on(OptionList.OptionSelected, "#mode")
    def mode_chosen(self, event: OptionList.OptionSelected) -> None:
        """DHCP goes on; a fixed address or Wi-Fi opens its form."""
        choice = str(event.option.id)
        self.answers.net_mode = choice
        if choice == "dhcp":
            self._show_form(None)
            self.next()
        elif choice == "static":
            self.answers.interface = self.answers.interface or self._wired()
            self._show_form("static")
            address = self.query_one("#address", Input)
            if not address.value:
                current = self._current_address(self.answers.interface)
                address.value = current or ""
            address.focus()
        else:
            self._show_form("wifi")
            ssids = self.query_one("#ssids", OptionList)
            (ssids if ssids.display and not self.query_one("#ssid", Input).value else self.query_one("#ssid", Input)).focus()

    def _current_address(self, name: str) -> str | None:
        for i in getattr(self.wizard.network, "interfaces", []) or []:
            if i.name == name and i.addresses:
                return str(i.addresses[0])
        return None

    @on(OptionList.OptionSelected, "#ssids")
    def ssid_chosen(self, event: OptionList.OptionSelected) -> None:
        """A scanned network: fill its name and ask for the passphrase."""
        self.query_one("#ssid", Input).value = str(event.option.id)
        self.query_one("#passphrase", Input).focus()

    @on(Input.Submitted, "#address")
    @on(Input.Submitted, "#gateway")
    @on(Input.Submitted, "#ssid")
    def field_done(self) -> None:
        """Enter in a field moves to the next one."""
        self.focus_next()

    @on(Input.Submitted, "#dns")
    def static_done(self) -> None:
        """Check the fixed address and go on."""
        self.save()
        problem = static_problem(self.answers.address, self.answers.gateway, self.answers.dns)
        if problem:
            self.show_error(problem)
            return
        self.next()

    @on(Input.Submitted, "#passphrase")
    def wifi_done(self) -> None:
        """Check the Wi-Fi answers and go on."""
        self.save()
        if not self.answers.wifi_ssid:
            self.show_error("Type the Wi-Fi network's name, or choose one from the list.")
            return
        problem = check_passphrase(self.answers.wifi_passphrase)
        if problem:
            self.show_error(f"The passphrase {problem} (leave it empty for an open network).")
            return
        self.next()


def static_problem(address: str, gateway: str, dns: str) -> str | None:
    """What is wrong with a fixed address, gateway and DNS list, or None."""
    if not address:
        return "Type the address with its prefix length, e.g. 192.168.1.20/24."
    problem = check_cidr(address)
    if problem:
        return f"The address {address!r} {problem}."
    net = ipaddress.ip_interface(address).network
    if gateway:
        try:
            if ipaddress.ip_address(gateway) not in net:
                return f"The gateway {gateway} is not in {net}; it is usually your router, e.g. {next(net.hosts())}."
        except ValueError:
            return f"The gateway {gateway!r} is not an IP address, e.g. 192.168.1.1."
    for server in dns.replace(",", " ").split():
        try:
            ipaddress.ip_address(server)
        except ValueError:
            return f"The DNS server {server!r} is not an IP address, e.g. 1.1.1.1."
    return None
