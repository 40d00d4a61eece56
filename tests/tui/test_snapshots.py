"""Snapshots of every wizard screen at 80x24 (pytest-textual-snapshot), with faked hardware, network and peers.

Cursor blink is frozen (cursor_blink=False) and every worker is waited for before the picture is taken.
Update after an intended change with ``pytest tests/tui/test_snapshots.py --snapshot-update`` and look
at the report.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from fakes import CODE_SECRET, FakeServices
from textual.pilot import Pilot

from hearth.mesh import household
from hearth_firstboot.answers import Answers
from hearth_firstboot.app import FirstBootApp

SIZE = (80, 24)
PW = "correct-horse-battery"


def steps(*keys: str) -> Callable[[Pilot], Awaitable[None]]:
    """Press *keys* one at a time, letting workers finish after each."""

    async def run(pilot: Pilot) -> None:
        await pilot.app.workers.wait_for_complete()
        await pilot.pause()
        for key in keys:
            await pilot.press(key)
            await pilot.app.workers.wait_for_complete()
            await pilot.pause()

    return run


TO_ADMIN = ("enter",) * 6
ADMIN_DONE = (*PW, "enter", *PW, "enter")


def app_for(services: FakeServices, **kw: object) -> FirstBootApp:
    return FirstBootApp(services, cursor_blink=False, **kw)  # type: ignore[arg-type]


def test_welcome(snap_compare, services: FakeServices) -> None:
    assert snap_compare(app_for(services), terminal_size=SIZE, run_before=steps())


def test_hardware(snap_compare, services: FakeServices) -> None:
    assert snap_compare(app_for(services), terminal_size=SIZE, run_before=steps("enter"))


def test_network(snap_compare, services: FakeServices) -> None:
    assert snap_compare(app_for(services), terminal_size=SIZE, run_before=steps("enter", "enter"))


def test_network_static(snap_compare, services: FakeServices) -> None:
    assert snap_compare(app_for(services), terminal_size=SIZE,
                        run_before=steps("enter", "enter", "down", "enter"))


def test_network_wifi(snap_compare, services: FakeServices) -> None:
    assert snap_compare(app_for(services), terminal_size=SIZE,
                        run_before=steps("enter", "enter", "down", "down", "enter"))


def test_name(snap_compare, services: FakeServices) -> None:
    assert snap_compare(app_for(services), terminal_size=SIZE, run_before=steps(*("enter",) * 3))


def test_household_create(snap_compare, services: FakeServices) -> None:
    assert snap_compare(app_for(services), terminal_size=SIZE, run_before=steps(*("enter",) * 4))


def test_household_join_failed(snap_compare, services: FakeServices) -> None:
    services.peer_secret = bytes(range(1, 33))
    code = household.code_for(bytes(32))
    assert snap_compare(app_for(services), terminal_size=SIZE,
                        run_before=steps(*("enter",) * 4, "down", "enter", *code, "enter"))


def test_model(snap_compare, services: FakeServices) -> None:
    assert snap_compare(app_for(services), terminal_size=SIZE, run_before=steps(*("enter",) * 5))


def test_model_with_household_pool(snap_compare, services: FakeServices) -> None:
    """Joined a household whose peer offers memory: a model that fits only across the pool is offered."""
    services.peer_secret = CODE_SECRET
    code = household.code_for(CODE_SECRET)
    assert snap_compare(app_for(services), terminal_size=SIZE,
                        run_before=steps(*("enter",) * 4, "down", "enter", *code, "enter", "down", "down"))  # to the pooled 32B


def test_admin(snap_compare, services: FakeServices) -> None:
    assert snap_compare(app_for(services), terminal_size=SIZE, run_before=steps(*TO_ADMIN, *PW, "enter"))


def test_review(snap_compare, services: FakeServices) -> None:
    assert snap_compare(app_for(services), terminal_size=SIZE, run_before=steps(*TO_ADMIN, *ADMIN_DONE))


def test_review_failed_step(snap_compare, services: FakeServices) -> None:
    services.fail_step = "Network"
    assert snap_compare(app_for(services), terminal_size=SIZE,
                        run_before=steps(*TO_ADMIN, *ADMIN_DONE, "enter"))


def test_done(snap_compare, services: FakeServices) -> None:
    assert snap_compare(app_for(services), terminal_size=SIZE,
                        run_before=steps(*TO_ADMIN, *ADMIN_DONE, "enter"))


def test_welcome_with_invalid_preset(snap_compare, services: FakeServices) -> None:
    answers = Answers.from_prefill({"node.name": "kitchen"})
    error = "/boot/hearth.yaml line 5: network.address must be an address with prefix length, e.g. 192.168.1.20/24"
    assert snap_compare(app_for(services, answers=answers, preset_error=error), terminal_size=SIZE,
                        run_before=steps())


def test_serial_console_ascii(snap_compare, services: FakeServices) -> None:
    """TERM=vt220 on ttyS0: ASCII borders only."""
    assert snap_compare(app_for(services, ascii_only=True), terminal_size=SIZE, run_before=steps(*("enter",) * 4))

