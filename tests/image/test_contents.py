"""What the image must contain to work, checked offline (seconds, no boot): the runtime's libraries
resolve, the services are enabled, the boot loaders and the data-partition growth are in place."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

LIB_DIRS = ("usr/lib/x86_64-linux-gnu", "usr/lib", "usr/lib64")


def needed(lib: Path) -> list[str]:
    """The DT_NEEDED sonames of a shared library (objdump, as on the build host)."""
    out = subprocess.run(["objdump", "-p", str(lib)], capture_output=True, text=True, check=True).stdout
    return re.findall(r"NEEDED\s+(\S+)", out)


def test_model_runtime_libraries_resolve(fs):
    """Every library and program of the runtime finds what it links to in the image: its own lib/, or the
    system's (libgomp, libstdc++, and libvulkan for the Vulkan backend); Mesa's drivers are there for it."""
    root = fs["root"]
    runtime = root / "usr/lib/hearth/runtime"
    programs = [runtime / "bin" / p for p in ("llama-server", "rpc-server", "llama-bench")]
    assert all(p.is_file() for p in programs), "the runtime's servers are missing from the image"
    backends = sorted((runtime / "bin").glob("libggml-*.so"))
    assert {"libggml-vulkan.so", "libggml-rpc.so", "libggml-cpu-x64.so"} <= {p.name for p in backends}
    libs = sorted((runtime / "lib").glob("*.so*"))
    ours = {p.name for p in libs}
    missing = set()
    for obj in programs + backends + libs:
        for soname in needed(obj):
            if soname not in ours and not any((root / d / soname).exists() for d in LIB_DIRS):
                missing.add(f"{soname} (for {obj.name})")
    assert not missing, f"not in the image: {sorted(missing)}"
    site = next((root / "usr/lib/hearth/venv/lib").glob("python3*/site-packages"))
    assert (site / "llama_cpp/llama_cpp.py").is_file() and not list(site.glob("llama_cpp/lib/*.so*")), \
        "llama-cpp-python must come without libraries of its own (it loads the runtime's)"
    icds = [p.name for p in (root / "usr/share/vulkan/icd.d").glob("*.json")]
    assert any(n.startswith("radeon") for n in icds) and any(n.startswith("intel") for n in icds), icds
    assert any(n.startswith("lvp") for n in icds) and any(n.startswith("nouveau") for n in icds), icds


def test_hearth_command_and_units(fs):
    root = fs["root"]
    hearth = root / "usr/bin/hearth"
    assert hearth.is_symlink() and (root / "usr/lib/hearth/venv/bin/hearth").is_file()
    wants = root / "etc/systemd/system/multi-user.target.wants"
    for unit in ("hearth-agent.service", "hearth-preset.service", "hearth-check.service", "hearth-page-password.path"):
        assert (wants / unit).is_symlink(), f"{unit} is not enabled by the presets"
    assert not (wants / "ssh.service").exists(), "SSH must be off until a key is configured"
    assert "hearth:" in (root / "etc/passwd").read_text(), "the agent's user is missing"


def test_boot_loaders_and_growth(fs):
    """systemd-boot and grub on the ESP, the preset example, and /var set to grow on first boot."""
    esp = fs["esp"]
    assert list((esp / "EFI/Linux").glob("*.efi")), "no UKI on the ESP"
    assert (esp / "EFI/systemd/systemd-bootx64.efi").exists() or (esp / "EFI/BOOT/BOOTX64.EFI").exists()
    assert (esp / "grub").exists() or list(esp.rglob("grub.cfg")), "no grub configuration for BIOS boots"
    assert (esp / "hearth.yaml.example").exists()
    root = fs["root"]
    assert "Type=var" in (root / "usr/lib/repart.d/20-var.conf").read_text()
    assert "x-systemd.growfs" in (root / "etc/fstab").read_text()


def test_household_page_ships_built(fs):
    """The page the agent serves at / is in the image, already built: npm ran on the build host (ci/page), and
    neither node nor the page's npm sources are in the image."""
    root = fs["root"]
    site = next((root / "usr/lib/hearth/venv/lib").glob("python3*/site-packages"))
    static = site / "hearth/page/static"
    for name in ("index.html", "app.js", "style.css", "app.js.gz"):
        assert (static / name).is_file(), f"{name} of the household page is missing from the image"
    assert "assets/app.js" in (static / "index.html").read_text()
    assert not (site / "hearth/page/web").exists()
    assert not (root / "usr/bin/node").exists() and not (root / "usr/bin/npm").exists()


def test_ab_layout(image, harness, fs):
    """The disk is the A/B layout (README, "Updates"): slot A's /usr is a squashfs with its verity tree and
    room for later versions, slot B and its verity partition are the same sizes and empty, the node's root
    and /var sit after them (/var last, so it can grow), and the UKI boots slot A by its verity root hash."""
    import configparser

    osr = configparser.ConfigParser()
    osr.read_string("[o]\n" + (fs["root"] / "usr/lib/os-release").read_text())
    version = osr["o"]["IMAGE_VERSION"].strip('"')
    parts = harness.partitions(image)
    names = [(p["type"].upper(), p.get("name", "")) for p in parts]
    usr, verity = "8484680C-9521-48C6-9C11-B0720656F69E", "77FF5F63-E7B6-4633-ACF4-1565B864C0E6"
    assert names == [("C12A7328-F81F-11D2-BA4B-00A0C93EC93B", "HEARTH"),
                     ("21686148-6449-6E6F-744E-656564454649", names[1][1]),
                     (usr, f"hearth_{version}"), (verity, f"hearth_{version}_verity"),
                     (usr, "_empty"), (verity, "_empty"),
                     ("4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709", "hearth-root"),
                     ("4D21B016-B534-45C2-A9FB-5C16E091FD2D", "hearth-var")], names
    a, a_verity, b, b_verity = parts[2:6]
    assert a["size"] == b["size"] and a_verity["size"] == b_verity["size"], "slot B must match slot A"
    with open(image, "rb") as disk:
        def read(part: dict, length: int, at: int = 0) -> bytes:
            disk.seek(part["start"] + at)
            return disk.read(length)

        head = read(a, 96)
        assert head[:4] == b"hsqs", "slot A is not a squashfs"
        used = int.from_bytes(head[40:48], "little")  # the squashfs superblock's bytes_used
        print(f"/usr squashfs: {used / 2**20:.0f} MiB of a {a['size'] / 2**20:.0f} MiB slot")
        assert used <= 0.9 * a["size"], "slot A leaves later versions less than 10 % to grow"
        assert read(a_verity, 8) == b"verity\0\0", "slot A's verity partition has no verity superblock"
        for empty in (b, b_verity):
            assert not any(read(empty, 1 << 20)), f"{empty['name']} must ship empty"
    root_hash = (a["uuid"] + a_verity["uuid"]).replace("-", "").lower()
    ukis = sorted((fs["esp"] / "EFI/Linux").glob("*.efi"))
    assert [u.name for u in ukis] == [f"hearth_{version}+3.efi"], "the UKI must carry three tries"
    assert f"usrhash={root_hash}".encode() in ukis[0].read_bytes(), "the UKI does not boot slot A"
    root = fs["root"]
    assert {p.name for p in (root / "usr/lib/sysupdate.d").glob("*.transfer")} == {
        "50-hearth-usr.transfer", "51-hearth-usr-verity.transfer", "90-hearth-uki.transfer"}
    assert (root / "usr/lib/systemd/system/boot-complete.target.requires/hearth-health.service").exists()
