"""Print every wizard screen as plain text at 80x24 (fake hardware/network/peers): for notes and reviews.

Run: .venv/bin/python tests/tui/screens_as_text.py
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from fakes import FakeServices, screen_text

from hearth.mesh import household
from hearth_firstboot.app import FirstBootApp

PW = "correct-horse-battery"
TOUR = [
    ("Welcome", []), ("Hardware", ["enter"]), ("Network", ["enter"]), ("Name", ["enter"]),
    ("Household (create)", ["enter"]), ("Model", ["enter"]), ("Admin", ["enter", *PW, "enter", *PW[:5]]),
    ("Review & apply", [*PW[5:], "enter"]), ("Done", ["enter"]),
]


VARIANTS = [
    ("Network: fixed address", {}, ["enter", "enter", "down", "enter"]),
    ("Network: Wi-Fi", {}, ["enter", "enter", "down", "down", "enter"]),
    ("Household: join refused by the peer", {"peer_secret": bytes(range(1, 33))},
     ["enter"] * 4 + ["down", "enter", *household.code_for(bytes(32)), "enter"]),
    ("Review: a step failed", {"fail_step": "Network"}, ["enter"] * 6 + [*PW, "enter", *PW, "enter", "enter"]),
    ("Serial console (TERM=vt220, ASCII borders): Household", {"ascii": True}, ["enter"] * 4),
]


async def tour(title_keys: list[tuple[str, list[str]]], fake: dict | None = None) -> None:
    """Walk *title_keys*, printing the screen after each group of keys."""
    fake = dict(fake or {})
    ascii_only = fake.pop("ascii", False)
    root = Path(tempfile.mkdtemp())
    (root / "etc").mkdir()
    app = FirstBootApp(FakeServices(root, **fake), cursor_blink=False, ascii_only=ascii_only)
    async with app.run_test(size=(80, 24)) as pilot:
        for title, keys in title_keys:
            for key in keys:
                await pilot.press(key)
                await app.workers.wait_for_complete()
                await pilot.pause()
            await app.workers.wait_for_complete()
            await pilot.pause()
            print(f"---- {title} " + "-" * (74 - len(title)))
            print(screen_text(app))


async def everything() -> None:
    """The default path, then the variants."""
    await tour(TOUR)
    for title, fake, keys in VARIANTS:
        await tour([(title, keys)], fake)


if __name__ == "__main__":
    asyncio.run(everything())
