"""apply(): the files a set-up writes under a temporary root, their modes, idempotence and crash safety."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from hearth import config
from hearth.errors import ConfigError
from hearth.mesh import household
from hearth.setup import apply, network, password

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIG0xyz me@laptop"


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """A minimal offline root: machine-id, passwd, group, shadow."""
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "machine-id").write_text("7f3a19c7c4c5404aaa1f6d2a48adfda4\n")
    (etc / "passwd").write_text("root:x:0:0:root:/root:/bin/bash\n")
    (etc / "group").write_text("root:x:0:\nsudo:x:27:\n")
    (etc / "shadow").write_text("root:*:19000:0:99999:7:::\n")
    os.chmod(etc / "shadow", 0o640)
    return tmp_path


def mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def snapshot(root: Path) -> dict[str, bytes | str]:
    out: dict[str, bytes | str] = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        out[rel] = ("-> " + os.readlink(p)) if p.is_symlink() else (p.read_bytes() if p.is_file() else "dir")
    return out


def full_config() -> config.Config:
    return config.from_dict({
        "node": {"name": "kitchen"},
        "console": {"keymap": "de"},
        "network": {"interface": "eth0", "mode": "static", "address": "192.168.1.20/24",
                    "gateway": "192.168.1.1", "dns": ["192.168.1.1"], "wifi_ssid": "Home", "wifi_passphrase": "correct horse"},
        "admin": {"password": "hunter2hunter2", "ssh_key": KEY},
        "household": {"mode": "create"},
    })


def test_default_path_files(root: Path) -> None:
    cfg = config.from_dict({"admin": {"password": "hunter2hunter2"}})
    done = dict(apply.apply(cfg, root))
    assert list(done)[-1] == "Finish"
    assert (root / "etc/hostname").read_text() == "hearth-7f3a\n"
    assert "127.0.1.1\thearth-7f3a" in (root / "etc/hosts").read_text()
    wired = (root / "etc/systemd/network/20-hearth-wired.network").read_text()
    assert "Type=ether" in wired and "DHCP=yes" in wired
    assert not list((root / "etc").glob("wpa_supplicant/*"))
    assert (root / "var/lib/hearth/configured").exists()
    assert household.load(root / "var/lib/hearth") is not None
    assert mode(root / "var/lib/hearth/household.json") == 0o600
    # SSH stays off without a key.
    assert not (root / apply.SSH_WANTS).is_symlink()
    shadow = (root / "etc/shadow").read_text()
    line = next(ln for ln in shadow.splitlines() if ln.startswith("admin:"))
    assert password.verify("hunter2hunter2", line.split(":")[1])
    assert "hunter2" not in (root / "etc/hearth/hearth.yaml").read_text()
    assert "admin:x:1000:1000:" in (root / "etc/passwd").read_text()
    assert "sudo:x:27:admin" in (root / "etc/group").read_text()


def test_full_config_files_and_modes(root: Path) -> None:
    cfg = full_config()
    apply.apply(cfg, root, wifi_iface="wlan0")
    eth0 = (root / "etc/systemd/network/10-hearth-eth0.network").read_text()
    assert "Address=192.168.1.20/24" in eth0 and "Gateway=192.168.1.1" in eth0 and "DNS=192.168.1.1" in eth0
    wpa = root / "etc/wpa_supplicant/wpa_supplicant-wlan0.conf"
    assert mode(wpa) == 0o600
    assert 'ssid="Home"' in wpa.read_text() and "correct horse" not in wpa.read_text()
    assert network.wpa_psk("Home", "correct horse") in wpa.read_text()
    assert (root / "etc/systemd/system/multi-user.target.wants/wpa_supplicant@wlan0.service").is_symlink()
    auth = root / "home/admin/.ssh/authorized_keys"
    assert auth.read_text() == KEY + "\n" and mode(auth) == 0o600
    assert os.readlink(root / apply.SSH_WANTS) == "/usr/lib/systemd/system/ssh.service"
    assert (root / "etc/vconsole.conf").read_text().startswith("KEYMAP=de\n")
    assert mode(root / "etc/shadow") == 0o640
    text = (root / "etc/hearth/hearth.yaml").read_text()
    for secret in ("correct horse", "hunter2", "password", "passphrase", "join_code"):
        assert secret not in text
    back = config.parse(text)
    assert back.node.name == "kitchen" and back.network.address == "192.168.1.20/24"


def test_rerun_is_idempotent(root: Path) -> None:
    cfg = full_config()
    apply.apply(cfg, root, wifi_iface="wlan0")
    first = snapshot(root)
    results = dict(apply.apply(cfg, root, wifi_iface="wlan0"))
    assert snapshot(root) == first
    assert "unchanged" in results["Household"] and results["Settings file"] == "unchanged"


def test_changing_answers_removes_old_files(root: Path) -> None:
    apply.apply(full_config(), root, wifi_iface="wlan0")
    plain = full_config().replace(**{"network.mode": "dhcp", "network.interface": "", "network.address": "",
                                     "network.gateway": "", "network.dns": [], "network.wifi_ssid": "",
                                     "network.wifi_passphrase": "", "admin.ssh_key": ""})
    apply.apply(plain, root)
    assert sorted(p.name for p in (root / "etc/systemd/network").iterdir()) == ["20-hearth-wired.network"]
    assert not list((root / "etc/wpa_supplicant").iterdir())
    assert not (root / apply.SSH_WANTS).is_symlink() and not (root / "home/admin/.ssh/authorized_keys").exists()


def test_join_stores_the_code_secret(root: Path, tmp_path: Path) -> None:
    other = household.create(tmp_path / "other")
    code = household.code_for(other.secret)
    cfg = config.from_dict({"household": {"mode": "join", "join_code": code}})
    done = dict(apply.apply(cfg, root))
    assert done["Household"] == f"joined household {other.id}"
    assert household.load(root / "var/lib/hearth") == other


def test_crash_halfway_leaves_no_half_file_and_no_marker(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    apply.apply(config.from_dict({"node": {"name": "before"}}), root)
    (root / "var/lib/hearth/configured").unlink()
    before = (root / "etc/hearth/hearth.yaml").read_text()
    real = apply.write_marker

    def boom(*a: object, **k: object) -> str:
        raise OSError(28, "No space left on device", "/var/lib/hearth/configured")

    # The disk fills while the settings file is half written: the old file must survive whole.
    import hearth.fsutil as fsutil

    real_open = fsutil.os.fdopen

    def failing_fdopen(fd: int, *a: object, **k: object):  # type: ignore[no-untyped-def]
        f = real_open(fd, *a, **k)
        orig = f.write

        def write(data: str) -> int:
            orig(data[: len(data) // 2])
            raise OSError(28, "No space left on device")

        f.write = write  # type: ignore[method-assign]
        return f

    monkeypatch.setattr(apply, "write_marker", boom)
    monkeypatch.setattr("hearth.fsutil.os.fdopen", failing_fdopen)
    with pytest.raises(apply.SetupError) as err:
        apply.apply(config.from_dict({"node": {"name": "after"}}), root)
    assert err.value.hint and "disk" in err.value.hint
    monkeypatch.setattr("hearth.fsutil.os.fdopen", real_open)
    assert (root / "etc/hearth/hearth.yaml").read_text() == before
    assert (root / "etc/hostname").read_text() == "before\n"
    assert not (root / "var/lib/hearth/configured").exists()
    assert not [p for p in root.rglob(".*.tmp")], "no temporary files left behind"
    # A crash in the last step only: every file is written, still no marker; a re-run completes it.
    with pytest.raises(apply.SetupError):
        apply.apply(config.from_dict({"node": {"name": "after"}}), root)
    assert (root / "etc/hostname").read_text() == "after\n"
    assert not (root / "var/lib/hearth/configured").exists()
    monkeypatch.setattr(apply, "write_marker", real)
    apply.apply(config.from_dict({"node": {"name": "after"}}), root)
    assert (root / "var/lib/hearth/configured").exists()


@pytest.mark.parametrize("data, word", [
    ({"network": {"mode": "static"}}, "network.address"),
    ({"network": {"mode": "static", "address": "10.0.0.5/24", "interface": "eth0", "gateway": "10.0.1.1"}}, "not in the network"),
    ({"network": {"wifi_passphrase": "12345678"}}, "wifi_ssid"),
    ({"household": {"mode": "join"}}, "join_code"),
    ({"household": {"mode": "join", "join_code": "HRTH-ABCD"}}, "join_code"),
    ({"admin": {"password": "short"}}, "8 characters"),
])
def test_invalid_combinations_are_refused_before_writing(root: Path, data: dict, word: str) -> None:
    with pytest.raises(ConfigError, match=word):
        apply.apply(config.from_dict(data), root)
    assert not (root / "etc/hostname").exists()


@pytest.mark.parametrize("pw, salt", [("hunter22", "saltsalt"), ("x" * 100, "0123456789abcdef"), ("pässwörd", "a.b/c")])
def test_sha512_crypt_matches_openssl(pw: str, salt: str) -> None:
    if not shutil.which("openssl"):
        pytest.skip("openssl not installed")
    ref = subprocess.run(["openssl", "passwd", "-6", "-salt", salt, pw], capture_output=True, text=True, check=True)
    assert password.sha512_crypt(pw, salt) == ref.stdout.strip()
    assert password.verify(pw, ref.stdout.strip()) and not password.verify(pw + "x", ref.stdout.strip())


def test_password_hash_from_a_preset_is_used_as_is(root: Path) -> None:
    hashed = password.sha512_crypt("from-openssl")
    apply.apply(config.from_dict({"admin": {"password_hash": hashed}}), root)
    assert f"admin:{hashed}:" in (root / "etc/shadow").read_text()


def test_network_discovery_parsers() -> None:
    data = json.loads('[{"ifname":"lo","addr_info":[{"family":"inet","local":"127.0.0.1","prefixlen":8}]},'
                      '{"ifname":"eth0","addr_info":[{"family":"inet","local":"192.168.1.20","prefixlen":24},'
                      '{"family":"inet6","local":"fe80::1","prefixlen":64}]}]')
    assert network.parse_ip_json(data) == {"lo": ["127.0.0.1/8"], "eth0": ["192.168.1.20/24"]}
    scan = "BSS 00:11(on wlan0)\n\tsignal: -70.00 dBm\n\tSSID: Far\nBSS 00:12\n\tsignal: -40.00 dBm\n\tSSID: Near\nBSS 3\n\tSSID: \n"
    assert network.parse_iw_scan(scan) == ["Near", "Far"]


def test_interfaces_from_sysfs(tmp_path: Path) -> None:
    """Physical ports only (a 'device' link), wireless ones told apart, link from operstate/carrier."""
    net = tmp_path / "sys/class/net"
    for name, wireless, oper in (("enp3s0", False, "up"), ("wlp2s0", True, "down"), ("lo", False, "unknown"),
                                 ("veth0", False, "up")):
        d = net / name
        d.mkdir(parents=True)
        (d / "operstate").write_text(oper + "\n")
        (d / "address").write_text("00:11:22:33:44:55\n")
        if name not in ("lo", "veth0"):
            (d / "device").mkdir()
        if wireless:
            (d / "wireless").mkdir()
    found = network.interfaces(net)
    assert [(i.name, i.wireless, i.link) for i in found] == [("enp3s0", False, True), ("wlp2s0", True, False)]
    assert apply.wifi_interface(config.from_dict({"network": {"wifi_ssid": "x"}}), net) == "wlp2s0"
