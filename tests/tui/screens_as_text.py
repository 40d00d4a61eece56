"""Print every wizard screen as plain text at 80x24 (fake hardware/network/peers): for notes and reviews.

Run: .venv/bin/python tests/tui/screens_as_text.py
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from fakes import FakeServices, screen_text  # noqa: E402

from hearth_firstboot.app import FirstBootApp  # noqa: E402

PW = "correct-horse-battery"
TOUR = [
    ("Welcome", []), ("Hardware", ["enter"]), ("Network", ["enter"]), ("Name", ["enter"]),
    ("Household (create)", ["enter"]), ("Model", ["enter"]), ("Admin", [*PW, "enter", *PW[:5]]),
    ("Review & apply", [*PW[5:], "enter"]), ("Done", ["enter"]),
]


async def tour() -> None:
    """Walk the default path, printing each screen."""
    root = Path(tempfile.mkdtemp())
    (root / "etc").mkdir()
    app = FirstBootApp(FakeServices(root), cursor_blink=False)
    async with app.run_test(size=(80, 24)) as pilot:
        for title, keys in TOUR:
            for key in keys:
                await pilot.press(key)
                await app.workers.wait_for_complete()
                await pilot.pause()
            await app.workers.wait_for_complete()
            await pilot.pause()
            print(f"---- {title} " + "-" * (74 - len(title)))
            print(screen_text(app))


if __name__ == "__main__":
    asyncio.run(tour())
