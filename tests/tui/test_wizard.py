"""The first-boot wizard under Textual's Pilot at 80x24: default path, household, errors, going back."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from fakes import CODE_SECRET, NEW_CODE, FakeServices, screen_text
from textual.pilot import Pilot
from textual.widgets import Input

from hearth.mesh import household
from hearth.setup import password
from hearth_firstboot.answers import Answers
from hearth_firstboot.app import FirstBootApp
from hearth_firstboot.screens.admin import AdminScreen
from hearth_firstboot.screens.done import DoneScreen
from hearth_firstboot.screens.household import HouseholdScreen
from hearth_firstboot.screens.model import ModelScreen
from hearth_firstboot.screens.name import NameScreen
from hearth_firstboot.screens.network import NetworkScreen
from hearth_firstboot.screens.review import ReviewScreen

SIZE = (80, 24)
PW = "correct-horse-battery"
SPECIAL = {"enter", "tab", "escape", "up", "down", "shift+tab", "backspace", "ctrl+u"}


class Keys:
    """Presses keys and counts the ones that are not typed text (the default-path figure)."""

    def __init__(self, pilot: Pilot) -> None:
        self.pilot = pilot
        self.special = 0
        self.typed = 0

    async def press(self, *keys: str) -> None:
        for key in keys:
            await self.pilot.press(key)
            if key in SPECIAL:  # "space" is typed text, like any letter
                self.special += 1
            else:
                self.typed += 1
            await settle(self.pilot)

    async def type(self, text: str) -> None:
        await self.press(*("space" if c == " " else c for c in text))


async def settle(pilot: Pilot) -> None:
    """Wait for workers (probes, peer checks, apply) and the messages they post."""
    await pilot.app.workers.wait_for_complete()
    await pilot.pause()


def on(app: FirstBootApp, kind: type) -> bool:
    return isinstance(app.screen, kind)


async def clear(keys: Keys, widget: Input) -> None:
    widget.value = ""
    await settle(keys.pilot)


async def to_screen(keys: Keys, kind: type) -> None:
    """Accept the defaults (Enter) until *kind* is showing."""
    for _ in range(10):
        if on(keys.pilot.app, kind):  # type: ignore[arg-type]
            return
        await keys.press("enter")
    raise AssertionError(f"never reached {kind.__name__}; on {type(keys.pilot.app.screen).__name__}")


async def admin_password(keys: Keys, pw: str = PW) -> None:
    await keys.type(pw)
    await keys.press("enter")
    await keys.type(pw)
    await keys.press("enter")


def read_config(root: Path) -> dict:
    return yaml.safe_load((root / "etc/hearth/hearth.yaml").read_text()) or {}


async def test_default_path_end_to_end(root: Path, services: FakeServices) -> None:
    """Enter on every screen plus the password twice sets the node up; the keystrokes are counted."""
    app = FirstBootApp(services, cursor_blink=False)
    async with app.run_test(size=SIZE) as pilot:
        keys = Keys(pilot)
        await settle(pilot)
        await to_screen(keys, AdminScreen)
        await admin_password(keys)
        assert on(app, ReviewScreen)
        await keys.press("enter")  # Apply
        assert on(app, DoneScreen), screen_text(app)
        text = screen_text(app)
        assert "http://192.168.1.57:8080/v1" in text and "hearth apikey" in text
        await keys.press("enter")  # Finish
    assert app.applied and app.return_value == 0
    print(f"\ndefault path: {keys.special} keystrokes besides {keys.typed} typed characters (the password twice)")
    assert keys.special <= 10
    assert (root / "etc/hostname").read_text() == "hearth-7f3a\n"
    assert "DHCP=yes" in (root / "etc/systemd/network/20-hearth-wired.network").read_text()
    assert (root / "var/lib/hearth/configured").exists()
    assert household.load(root / "var/lib/hearth").secret == CODE_SECRET, "the code shown is the household made"
    cfg = read_config(root)
    assert cfg["model"]["name"] == "qwen2.5-7b-instruct"
    text = (root / "etc/hearth/hearth.yaml").read_text()
    assert PW not in text and NEW_CODE not in text
    shadow = next(ln for ln in (root / "etc/shadow").read_text().splitlines() if ln.startswith("admin:"))
    assert password.verify(PW, shadow.split(":")[1])
    assert services.calls == ["loadkeys us"]


async def test_create_household_shows_the_code(root: Path, services: FakeServices) -> None:
    app = FirstBootApp(services, cursor_blink=False)
    async with app.run_test(size=SIZE) as pilot:
        keys = Keys(pilot)
        await to_screen(keys, HouseholdScreen)
        text = screen_text(app)
        for group in NEW_CODE.split("-"):
            assert group in text
        await keys.press("enter")
        assert on(app, ModelScreen) and app.answers.household_mode == "create"


async def join_with(keys: Keys, code: str) -> None:
    await to_screen(keys, HouseholdScreen)
    await keys.press("down", "enter")
    await keys.type(code)
    await keys.press("enter")


async def test_join_household_checked_live(root: Path, services: FakeServices, tmp_path: Path) -> None:
    secret = bytes(range(1, 33))
    services.peer_secret = secret
    app = FirstBootApp(services, cursor_blink=False)
    async with app.run_test(size=SIZE) as pilot:
        keys = Keys(pilot)
        await join_with(keys, household.code_for(secret))
        assert on(app, ModelScreen), screen_text(app)
        assert services.calls.count("peer-check") == 1
        await to_screen(keys, AdminScreen)
        await admin_password(keys)
        await keys.press("enter")
        assert on(app, DoneScreen)
    assert household.load(root / "var/lib/hearth").secret == secret
    assert read_config(root)["household"]["mode"] == "join"


async def test_joining_offers_models_that_fit_only_in_the_household_pool(root: Path, services: FakeServices) -> None:
    """Once the join code is known, the household's offers add "runs on 2 household nodes" models; one is
    chosen with the keyboard and becomes model.name (the node fetches it and forms the pool when it starts)."""
    secret = bytes(range(1, 33))
    services.peer_secret = secret
    app = FirstBootApp(services, cursor_blink=False)
    async with app.run_test(size=SIZE) as pilot:
        keys = Keys(pilot)
        await join_with(keys, household.code_for(secret))
        assert on(app, ModelScreen), screen_text(app)
        assert services.calls.count("pool-models") == 1
        text = screen_text(app)
        assert "Qwen2.5 32B Instruct Q4_K_M (runs on 2 household nodes, 21.5 GiB)" in text, text
        assert text.index("runs on 2 household nodes") < text.index("(USB drive)") < text.index("No model for now")
        assert "recommended" in text.splitlines()[5]  # the PC's own pick stays first and highlighted
        await keys.press("down", "down")
        assert "across the household pool on hearth-b + this node" in screen_text(app)
        await keys.press("enter")
        assert on(app, AdminScreen)
        await admin_password(keys)
        await keys.press("enter")
        assert on(app, DoneScreen)
    assert read_config(root)["model"]["name"] == "qwen2.5-32b-instruct"


async def test_a_new_household_asks_no_peer_for_pool_models(root: Path, services: FakeServices) -> None:
    app = FirstBootApp(services, cursor_blink=False)
    async with app.run_test(size=SIZE) as pilot:
        keys = Keys(pilot)
        await to_screen(keys, ModelScreen)
        assert "pool-models" not in services.calls and "household nodes" not in screen_text(app)


async def test_join_refused_by_peer_says_so_and_stays(root: Path, services: FakeServices) -> None:
    services.peer_secret = bytes(range(1, 33))
    app = FirstBootApp(services, cursor_blink=False)
    async with app.run_test(size=SIZE) as pilot:
        keys = Keys(pilot)
        await join_with(keys, household.code_for(bytes(32)))
        assert on(app, HouseholdScreen)
        assert "does not accept this code" in screen_text(app)
        await keys.press("enter")  # a refusal is never overridden by pressing Enter again
        assert on(app, HouseholdScreen)


async def test_mistyped_code_is_caught_without_traffic(root: Path, services: FakeServices) -> None:
    code = household.code_for(bytes(range(1, 33)))
    typo = code[:-1] + ("0" if code[-1] != "0" else "1")
    app = FirstBootApp(services, cursor_blink=False)
    async with app.run_test(size=SIZE) as pilot:
        keys = Keys(pilot)
        await join_with(keys, typo)
        assert on(app, HouseholdScreen)
        assert "mistyped" in screen_text(app)
        assert "peer-check" not in services.calls


async def test_join_with_no_peer_needs_a_second_enter(root: Path, services: FakeServices) -> None:
    app = FirstBootApp(services, cursor_blink=False)
    async with app.run_test(size=SIZE) as pilot:
        keys = Keys(pilot)
        await join_with(keys, household.code_for(bytes(range(1, 33))))
        assert on(app, HouseholdScreen)
        assert "No other Hearth node answered" in screen_text(app)
        await keys.press("enter")
        assert on(app, ModelScreen)


async def test_back_navigation_keeps_everything_typed(root: Path, services: FakeServices) -> None:
    app = FirstBootApp(services, cursor_blink=False)
    async with app.run_test(size=SIZE) as pilot:
        keys = Keys(pilot)
        await to_screen(keys, NetworkScreen)
        await keys.press("down", "enter")  # fixed address
        address = app.screen.query_one("#address", Input)
        assert address.value == "192.168.1.57/24", "prefilled from the current DHCP lease"
        await clear(keys, address)
        await keys.type("192.168.1.20/24")
        await keys.press("enter")
        await keys.type("192.168.1.1")
        await keys.press("enter", "enter")
        assert on(app, NameScreen)
        name = app.screen.query_one("#hostname", Input)
        await clear(keys, name)
        await keys.type("kitchen")
        await keys.press("enter")
        await to_screen(keys, AdminScreen)
        await keys.type(PW)
        await keys.press("escape")  # back to Model without finishing the password
        assert on(app, ModelScreen)
        for _ in range(3):
            await keys.press("escape")
        assert on(app, NetworkScreen)
        assert app.screen.query_one("#address", Input).value == "192.168.1.20/24"
        assert app.screen.query_one("#gateway", Input).value == "192.168.1.1"
        await keys.press("escape")
        await keys.press("enter")  # Hardware -> Network again: a new screen, filled from the answers
        assert on(app, NetworkScreen)
        assert app.screen.query_one("#address", Input).value == "192.168.1.20/24"
        await to_screen(keys, NameScreen)
        assert app.screen.query_one("#hostname", Input).value == "kitchen"
        await to_screen(keys, AdminScreen)
        assert app.screen.query_one("#password", Input).value == PW
        await keys.press("enter")
        await keys.type(PW)
        await keys.press("enter", "enter")
        assert on(app, DoneScreen), screen_text(app)
    eth = (root / "etc/systemd/network/10-hearth-enp3s0.network").read_text()
    assert "Address=192.168.1.20/24" in eth and "Gateway=192.168.1.1" in eth
    assert (root / "etc/hostname").read_text() == "kitchen\n"


async def test_invalid_hostname(root: Path, services: FakeServices) -> None:
    app = FirstBootApp(services, cursor_blink=False)
    async with app.run_test(size=SIZE) as pilot:
        keys = Keys(pilot)
        await to_screen(keys, NameScreen)
        await clear(keys, app.screen.query_one("#hostname", Input))
        await keys.type("Kitchen PC")
        await keys.press("enter")
        assert on(app, NameScreen)
        assert "must be 1-63 lowercase letters" in screen_text(app)
        await clear(keys, app.screen.query_one("#hostname", Input))
        await keys.press("enter")
        assert on(app, NameScreen) and "must not be empty" in screen_text(app)


async def test_invalid_password(root: Path, services: FakeServices) -> None:
    app = FirstBootApp(services, cursor_blink=False)
    async with app.run_test(size=SIZE) as pilot:
        keys = Keys(pilot)
        await to_screen(keys, AdminScreen)
        await admin_password(keys, "short")
        assert on(app, AdminScreen) and "at least 8 characters" in screen_text(app)
        assert "too short" in screen_text(app)
        await clear(keys, app.screen.query_one("#password", Input))
        await keys.type(PW)
        await keys.press("enter")
        await clear(keys, app.screen.query_one("#confirm", Input))
        await keys.type(PW + "x")
        await keys.press("enter")
        assert on(app, AdminScreen) and "differ" in screen_text(app)
        await keys.press("tab")
        await keys.type("not-a-key")
        await clear(keys, app.screen.query_one("#confirm", Input))
        app.screen.query_one("#confirm", Input).value = PW
        await keys.press("enter")
        assert on(app, AdminScreen) and "SSH key must be one public key line" in screen_text(app)


@pytest.mark.parametrize("address, gateway, dns, message", [
    ("192.168.1.300/24", "", "", "must be an address with prefix length"),
    ("192.168.1.20", "", "", "must include the prefix length"),
    ("192.168.1.20/24", "10.0.0.1", "", "is not in 192.168.1.0/24"),
    ("192.168.1.20/24", "192.168.1.1", "one.one.one.one", "is not an IP address"),
])
async def test_invalid_static_address(root: Path, services: FakeServices, address: str, gateway: str, dns: str,
                                      message: str) -> None:
    app = FirstBootApp(services, cursor_blink=False)
    async with app.run_test(size=SIZE) as pilot:
        keys = Keys(pilot)
        await to_screen(keys, NetworkScreen)
        await keys.press("down", "enter")
        for field, value in (("#address", address), ("#gateway", gateway), ("#dns", dns)):
            app.screen.query_one(field, Input).value = value
        app.screen.query_one("#dns", Input).focus()
        await keys.press("enter")
        assert on(app, NetworkScreen)
        assert message in screen_text(app)


async def test_wifi(root: Path, services: FakeServices) -> None:
    app = FirstBootApp(services, cursor_blink=False)
    async with app.run_test(size=SIZE) as pilot:
        keys = Keys(pilot)
        await to_screen(keys, NetworkScreen)
        await keys.press("down", "down", "enter")  # Wi-Fi
        await keys.press("enter")  # the strongest network, Home
        await keys.type("short")
        await keys.press("enter")
        assert on(app, NetworkScreen) and "8 to 63" in screen_text(app)
        await clear(keys, app.screen.query_one("#passphrase", Input))
        await keys.type("correct horse")
        await keys.press("enter")
        assert on(app, NameScreen)
        await to_screen(keys, AdminScreen)
        await admin_password(keys)
        await keys.press("enter")
        assert on(app, DoneScreen)
    wpa = root / "etc/wpa_supplicant/wpa_supplicant-wlp2s0.conf"
    assert 'ssid="Home"' in wpa.read_text() and "correct horse" not in wpa.read_text()
    assert wpa.stat().st_mode & 0o777 == 0o600


async def test_failed_step_shows_what_to_do_and_back_keeps_answers(root: Path, services: FakeServices) -> None:
    services.fail_step = "Network"
    app = FirstBootApp(services, cursor_blink=False)
    async with app.run_test(size=SIZE) as pilot:
        keys = Keys(pilot)
        await to_screen(keys, AdminScreen)
        await admin_password(keys)
        await keys.press("enter")
        assert on(app, ReviewScreen)
        text = screen_text(app)
        assert "[!!] Network: cannot write Network" in text and "What to do: free some space" in text
        assert "[ok] Hostname" in text
        assert not (root / "var/lib/hearth/configured").exists()
        await keys.press("escape")
        assert on(app, AdminScreen)
        assert app.screen.query_one("#confirm", Input).value == PW
        services.fail_step = None
        await keys.press("enter")  # Enter on the password field moves to the confirmation...
        await keys.press("enter")  # ...which is still filled in: on to Review
        await keys.press("enter")
        assert on(app, DoneScreen)
    assert (root / "var/lib/hearth/configured").exists()


async def test_invalid_preset_opens_prefilled_with_error(root: Path, services: FakeServices) -> None:
    from hearth.setup import preset

    (root / "boot").mkdir()
    path = root / "boot/hearth.yaml"
    path.write_text("node:\n  name: kitchen\nnetwork:\n  mode: static\n  address: 192.168.1.300/24\n"
                    "admin:\n  password: hunter2hunter2\n")
    found = preset.read(path)
    assert not found.valid
    app = FirstBootApp(services, answers=Answers.from_prefill(found.prefill), preset_error=found.error,
                       cursor_blink=False)
    async with app.run_test(size=SIZE) as pilot:
        keys = Keys(pilot)
        await settle(pilot)
        text = screen_text(app)
        assert "The preset on the stick was not used" in text and "network.address" in text
        await to_screen(keys, NameScreen)
        assert app.screen.query_one("#hostname", Input).value == "kitchen"
        await to_screen(keys, AdminScreen)
        assert app.screen.query_one("#password", Input).value == "hunter2hunter2"


def test_wizard_never_imports_the_model_runtime(root: Path) -> None:
    """Importing the app and running the real hardware/model services leaves llama_cpp unloaded."""
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "from hearth_firstboot.app import FirstBootApp, main\n"
        "from hearth_firstboot.services import Services\n"
        "s = Services(Path('/'))\n"
        "hw = s.hardware()\n"
        "s.models(hw)\n"
        "print('llama_cpp' in sys.modules, hw.meaning != '' or hw.problem is not None)\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["False", "True"]


def test_model_choices_say_what_is_on_the_stick_and_what_downloads(tmp_path: Path) -> None:
    """On a mini PC with the stick's bundled Gemma 270M in the store, the recommendation (a bigger model)
    says it downloads and that the bundled model answers until then; the bundled one is marked."""
    import shutil

    from hearth_firstboot.services import Services

    root = tmp_path / "root"
    shutil.copytree(Path(__file__).resolve().parents[1] / "fixtures/machines/minipc-n100", root, symlinks=True)
    store = root / "var/lib/hearth/models"
    store.mkdir(parents=True)
    (store / "gemma-3-270m-q4_k_m.gguf").write_bytes(b"GGUF" + bytes(60))
    services = Services(root)
    view = services.models(services.hardware())
    assert view.problem is None, view.problem
    first = view.options[0]
    assert first.name != "gemma3-270m" and "(on this stick)" not in first.label, first
    assert "Downloads" in first.reason and "until then gemma3-270m (on this stick) answers" in first.reason, first
    bundled = [o for o in view.options if o.name == "gemma3-270m"]
    assert bundled and bundled[0].label.endswith("(on this stick)"), view.options
