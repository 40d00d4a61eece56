"""Presets: found on the stick, validated, applied with no keyboard, secrets scrubbed from the FAT file."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
import yaml

from hearth import config
from hearth.cli import main as hearth_main
from hearth.mesh import household
from hearth.setup import apply, password, preset

VALID = """\
# Preset for the kitchen PC (edited on Windows)
node:
  name: kitchen   # shows up as kitchen.local
network:
  wifi_ssid: Home
  wifi_passphrase: "correct horse"
admin:
  password: hunter2hunter2
household:
  mode: join
  join_code: {code}
"""


@pytest.fixture
def root(tmp_path: Path) -> Path:
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc/machine-id").write_text("7f3a19c7c4c5404aaa1f6d2a48adfda4\n")
    (tmp_path / "boot").mkdir()
    return tmp_path


@pytest.fixture
def code(tmp_path: Path) -> str:
    return household.code_for(household.create(tmp_path / "other").secret)


def test_find_searches_the_stick_paths(root: Path) -> None:
    assert preset.find(root) is None
    (root / "run/hearth-cfg").mkdir(parents=True)
    (root / "run/hearth-cfg/hearth.yaml").write_text("{}\n")
    assert preset.find(root) == root / "run/hearth-cfg/hearth.yaml"
    (root / "efi").mkdir()
    (root / "efi/hearth.yaml").write_text("{}\n")
    assert preset.find(root) == root / "efi/hearth.yaml"


def test_valid_preset_is_applied_and_scrubbed(root: Path, code: str) -> None:
    path = root / "boot/hearth.yaml"
    # Notepad writes a BOM and CRLF line ends.
    path.write_bytes(b"\xef\xbb\xbf" + VALID.format(code=code).replace("\n", "\r\n").encode())
    out = preset.run(root)
    assert out.status == "applied"
    assert out.scrubbed == ["admin.password", "household.join_code", "network.wifi_passphrase"]
    assert (root / "var/lib/hearth/configured").exists()
    assert (root / "etc/hostname").read_text() == "kitchen\n"
    assert household.load(root / "var/lib/hearth").secret == household.verify_code(code)
    shadow = next(ln for ln in (root / "etc/shadow").read_text().splitlines() if ln.startswith("admin:"))
    assert password.verify("hunter2hunter2", shadow.split(":")[1])
    left = path.read_bytes().decode()
    assert "\r\n" in left, "line ends kept as the person's editor wrote them"
    for secret in ("correct horse", "hunter2hunter2", code):
        assert secret not in left
    assert "# Preset for the kitchen PC" in left and "# shows up as kitchen.local" in left
    assert "# wifi_passphrase: applied on" in left
    remaining = config.parse(left.replace("\r\n", "\n"))
    assert remaining.node.name == "kitchen" and remaining.network.wifi_ssid == "Home"
    assert not preset.has_secrets(path)
    # The next boot finds the node configured and leaves the stick alone.
    assert preset.run(root).status == "configured"


def test_flow_style_secrets_are_scrubbed_too(root: Path) -> None:
    path = root / "boot/hearth.yaml"
    path.write_text("admin: {password: hunter2hunter2}\nnode: {name: den}\n")
    assert preset.run(root).status == "applied"
    data = yaml.safe_load(path.read_text())
    assert data == {"admin": {}, "node": {"name": "den"}}


@pytest.mark.parametrize("text, error, kept", [
    ("node:\n  name: Kitchen PC\nnetwork:\n  wifi_ssid: Home\n", "node.name must be", {"network.wifi_ssid": "Home"}),
    ("network:\n  mode: static\n  address: 10.0.0.300/24\nnode:\n  name: den\n", "line 3", {"node.name": "den"}),
    ("household:\n  mode: join\n  join_code: HRTH-1234\nnode:\n  name: den\n", "join_code", {"node.name": "den"}),
    ("node:\n  name: [den\n", "not valid YAML", {}),
    ("nodes:\n  name: den\n", "did you mean", {}),
])
def test_invalid_preset_is_left_alone_with_error_and_prefill(root: Path, text: str, error: str, kept: dict) -> None:
    path = root / "boot/hearth.yaml"
    path.write_text(text)
    out = preset.run(root)
    assert out.status == "invalid" and out.preset is not None
    assert error in (out.preset.error or "") or error in (out.preset.hint or "")
    for key, value in kept.items():
        assert out.preset.prefill[key] == value
    assert path.read_text() == text, "an invalid preset is not touched"
    assert not apply.is_configured(None, root)


def test_cli_apply_with_scrub(root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "p.yaml"
    path.write_text("node:\n  name: den\nadmin:\n  password: hunter2hunter2\n")
    path.chmod(0o600)
    rc = hearth_main(["setup", "apply", "--root", str(root), "--preset", str(path), "--scrub"])
    assert rc == 0
    assert "removed admin.password" in capsys.readouterr().out
    assert "hunter2" not in path.read_text() and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert (root / "etc/hostname").read_text() == "den\n"


def test_cli_preset_invalid_exit_code(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (root / "boot/hearth.yaml").write_text("node:\n  name: BAD NAME\n")
    assert hearth_main(["setup", "preset", "--root", str(root)]) == 2
    assert "node.name" in capsys.readouterr().err


def test_image_preset_paths_file_is_searched_first(root: Path) -> None:
    (root / "usr/lib/hearth").mkdir(parents=True)
    (root / "usr/lib/hearth/preset-paths").write_text("# comment\n/efi/hearth.yaml\n/run/credentials/@system/hearth.yaml\n")
    (root / "boot/hearth.yaml").write_text("{}\n")
    cred = root / "run/credentials/@system"
    cred.mkdir(parents=True)
    (cred / "hearth.yaml").write_text("node:\n  name: fromcred\n")
    assert preset.find(root) == cred / "hearth.yaml"
    (root / "efi").mkdir()
    (root / "efi/hearth.yaml").write_text("{}\n")
    assert preset.find(root) == root / "efi/hearth.yaml"
