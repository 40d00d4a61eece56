"""ci/flash's safety logic against fake `lsblk --json` trees (no disks are touched)."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
_loader = importlib.machinery.SourceFileLoader("hearth_flash", str(ROOT / "ci" / "flash"))
_spec = importlib.util.spec_from_loader("hearth_flash", _loader)
assert _spec
flash = importlib.util.module_from_spec(_spec)
sys.modules["hearth_flash"] = flash  # dataclasses look their module up
_loader.exec_module(flash)

GiB = 1 << 30


def dev(name, size, *, rm=False, tran=None, ro=False, mounts=(), children=(), type_="disk"):
    return {"name": name, "path": f"/dev/{name}", "size": size, "type": type_, "tran": tran, "rm": rm,
            "hotplug": False, "ro": ro, "model": "Model", "vendor": "Vendor", "mountpoints": list(mounts) or [None],
            "children": list(children)}


TREE = {"blockdevices": [
    # The system disk: / on a partition, and it is a USB disk (a PC booted from a stick).
    dev("sda", 64 * GiB, tran="usb", rm=True, children=[dev("sda1", 1 * GiB, mounts=["/boot/efi"], type_="part"),
                                                        dev("sda2", 63 * GiB, mounts=["/"], type_="part")]),
    dev("nvme0n1", 512 * GiB, tran="nvme"),
    dev("sdb", 16 * GiB, tran="usb"),                                             # a fresh stick
    dev("sdc", 8 * GiB, rm=True, children=[dev("sdc1", 8 * GiB, mounts=["/media/stick"], type_="part")]),
    dev("sdd", 1 * GiB, rm=True),                                                 # too small
    dev("sde", 32 * GiB, tran="usb", ro=True),                                    # write-protected
    dev("sdf", 32 * GiB, rm=True, children=[dev("sdf1", 32 * GiB, mounts=["[SWAP]"], type_="part")]),
    dev("loop0", 1 * GiB, type_="loop"),
]}


def test_lists_only_free_removable_disks():
    assert [d.path for d in flash.candidates(TREE)] == ["/dev/sdb", "/dev/sdd"]


def test_accepts_a_free_stick_that_fits():
    assert flash.check_target(TREE, "/dev/sdb", 2 * GiB).path == "/dev/sdb"


@pytest.mark.parametrize(("device", "why"), [
    ("/dev/sda", "holds the running system"),
    ("/dev/sda2", "is a partition"),
    ("/dev/nvme0n1", "not a removable"),
    ("/dev/sdc", "in use"),
    ("/dev/sdf", "in use"),
    ("/dev/sdd", "the image needs"),
    ("/dev/sde", "read-only"),
    ("/dev/loop0", "not a disk"),
    ("/dev/sdz", "not a disk"),
])
def test_refuses(device, why):
    with pytest.raises(flash.FlashError, match=why):
        flash.check_target(TREE, device, 2 * GiB)


def test_old_lsblk_flags_and_single_mountpoint():
    # util-linux before 2.37: "1"/"0" strings and one "mountpoint" per device.
    tree = {"blockdevices": [{"name": "sdb", "size": "8589934592", "type": "disk", "rm": "1", "ro": "0",
                              "tran": None, "mountpoint": None,
                              "children": [{"name": "sdb1", "type": "part", "mountpoint": "/mnt"}]}]}
    with pytest.raises(flash.FlashError, match="in use"):
        flash.check_target(tree, "/dev/sdb", GiB)


def test_write_copies_and_reports(tmp_path):
    image = tmp_path / "hearth.raw"
    image.write_bytes(bytes(range(256)) * 40000)
    target = tmp_path / "stick"
    target.write_bytes(b"")
    progress = tmp_path / "progress"
    with progress.open("w") as out:
        flash.write(image, str(target), out=out)
    assert target.read_bytes() == image.read_bytes()
    assert "100.0%" in progress.read_text() and "wrote" in progress.read_text()


def test_unconfirmed_writes_nothing(tmp_path, monkeypatch, capsys):
    image = tmp_path / "hearth.raw"
    image.write_bytes(b"x" * 1024)
    monkeypatch.setattr(flash, "read_lsblk", lambda: TREE)
    monkeypatch.setattr(flash, "write", lambda *a, **k: pytest.fail("must not write"))
    assert flash.main([str(image), "/dev/sdb", "--yes", "/dev/sdc"]) == 1
    assert "not confirmed" in capsys.readouterr().err
