"""The boot's health verdict (hearth-health.service, before boot-complete.target): bless or roll back.

Healthy means what the image tests' hearth-check says: the agent is active, its API answers, and the
model generates a token. A node not configured yet (the first-boot wizard is waiting) is judged on the OS
alone. An unhealthy boot from a counted entry is marked bad with systemd-bless-boot and the node reboots
into the entry systemd-boot falls back to; with nothing to fall back to it stays up, so a node is never
put in a reboot loop by its own verdict.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

from .apply import ESP
from .boot import entries, fallback, find, selected_entry

CHECK = "/usr/lib/hearth/check"
BLESS = "/usr/lib/systemd/systemd-bless-boot"
CONFIGURED = Path("/var/lib/hearth/configured")

log = logging.getLogger(__name__)


def say(text: str) -> None:
    """One line on the console (the unit sends stdout to journal+console)."""
    print(f"hearth-health: {text}", flush=True)


def verdict(check: str = CHECK, configured: Path = CONFIGURED) -> bool:
    """Whether this boot is healthy."""
    if not configured.exists():
        say("node not configured yet: judged on the OS alone, healthy")
        return True
    env = dict(os.environ)
    env.pop("CREDENTIALS_DIRECTORY", None)
    # The check's own lines ("hearth-check: ...", "hearth-check: exit N") are relabelled: on the console they
    # would otherwise read as hearth-check.service's verdict, which the image tests wait for on the same boot.
    proc = subprocess.Popen([check], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            errors="replace")
    assert proc.stdout is not None
    for line in proc.stdout:
        say("check: " + line.rstrip("\n").removeprefix("hearth-check: "))
    return proc.wait() == 0


def decide(esp: Path, current: str | None) -> str:
    """'rollback' when the current entry is counted and another good entry exists, else 'stay'."""
    all_entries = entries(esp)
    me = find(all_entries, current)
    if me is None or me.state == "good":
        return "stay"
    return "rollback" if fallback(all_entries, current) else "stay"


def main() -> int:
    """Entry point of hearth-health.service."""
    if verdict():
        say("healthy: this boot is blessed")
        return 0
    current = selected_entry()
    action = decide(ESP, current)
    if action == "rollback":
        say(f"unhealthy: marking {current} bad and rebooting into the previous version")
        subprocess.run([BLESS, "bad"], check=False)
        subprocess.run(["systemctl", "reboot", "--no-block"], check=False)
    else:
        say(f"unhealthy, but {current or 'this boot'} has nothing to fall back to: staying up")
    return 1


if __name__ == "__main__":
    sys.exit(main())
