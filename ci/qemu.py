#!/usr/bin/env python3
"""Boot a Hearth disk image in qemu: the image tests' harness, and a tool for people.

    python3 ci/qemu.py boot IMAGE [--uefi|--bios] [--disk-size 8G] [--port 8080] [--preset hearth.yaml]
    python3 ci/qemu.py check IMAGE [--uefi|--bios] [...]       boot, wait for hearth-check, exit with it
    python3 ci/qemu.py preset IMAGE hearth.yaml                write the preset onto the image's FAT partition
    python3 ci/qemu.py accel                                   print kvm or tcg (what this host really runs)

The image is never booted in place: each VM gets a scratch copy (optionally grown, to test the data
partition's growth) and its own copy of the UEFI variable store. The serial console goes to a unix
socket (for pexpect-style driving) and is logged to a file that `VM.wait_for()` watches. A monitor socket
gives a clean `system_powerdown`. User networking forwards a host port to the guest's API (8080);
`lan=` adds a second NIC on a virtual LAN: "GROUP:PORT" (qemu socket multicast, any number of guests)
or "unix:LOCAL:REMOTE" (two guests over datagram sockets, for hosts without multicast).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")
ESP_TYPE = "c12a7328-f81f-11d2-ba4b-00a0c93ec93b"
CHECK_VERDICT = re.compile(rb"hearth-check: exit (\d+)")


class QemuError(RuntimeError):
    """qemu could not start, died, or the guest never showed what we waited for."""


def _size(text: str) -> int:
    """Bytes in a size like 4G, 512M or 1048576."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    text = text.strip().upper().removesuffix("B").removesuffix("I")
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


def kvm_works(timeout: float = 30.0) -> bool:
    """Whether KVM really runs a guest here: /dev/kvm alone is not enough (kvm_pvm fails in firmware).

    The probe boots OVMF with no disk under KVM and must see the firmware's boot manager on the serial
    line. The answer is cached per boot of the host in /run (or $TMPDIR).
    """
    if os.environ.get("HEARTH_QEMU_ACCEL") in ("kvm", "tcg"):
        return os.environ["HEARTH_QEMU_ACCEL"] == "kvm"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK) or not OVMF_CODE.exists():
        return False
    cache_dir = Path("/run") if os.access("/run", os.W_OK) else Path(tempfile.gettempdir())
    boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    cached = cache_dir / f"hearth-kvm-probe-{boot_id}"
    if cached.exists():
        return cached.read_text().strip() == "kvm"
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "serial.log"
        vars_copy = Path(tmp) / "vars.fd"
        shutil.copyfile(OVMF_VARS, vars_copy)
        cmd = ["qemu-system-x86_64", "-accel", "kvm", "-machine", "q35", "-cpu", "host", "-m", "256",
               "-display", "none", "-nodefaults", "-no-reboot", "-serial", f"file:{log}",
               "-drive", f"if=pflash,format=raw,readonly=on,file={OVMF_CODE}",
               "-drive", f"if=pflash,format=raw,file={vars_copy}", "-net", "none"]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        ok = False
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and proc.poll() is None:
            if log.exists() and re.search(rb"BdsDxe|Shell>|UEFI Interactive Shell|Boot0", log.read_bytes()):
                ok = True
                break
            time.sleep(0.5)
        proc.kill()
        proc.wait()
    cached.write_text("kvm" if ok else "tcg")
    return ok


def partitions(image: Path) -> list[dict[str, Any]]:
    """The image's GPT entries as sfdisk reports them, with start and size in bytes (type, name, uuid)."""
    out = subprocess.run(["sfdisk", "--json", str(image)], check=True, capture_output=True, text=True).stdout
    table = json.loads(out)["partitiontable"]
    sector = int(table.get("sectorsize", 512))
    return [{**p, "start": int(p["start"]) * sector, "size": int(p["size"]) * sector} for p in table["partitions"]]


def esp_offset(image: Path) -> int:
    """Byte offset of the image's FAT partition (the ESP, label HEARTH), read from its GPT."""
    for part in partitions(image):
        if part["type"].lower() == ESP_TYPE:
            return int(part["start"])
    raise QemuError(f"{image}: no EFI system partition in its partition table")


def put_preset(image: Path, preset: Path | str, name: str = "hearth.yaml") -> None:
    """Copy a preset file onto the image's FAT partition with mtools (no mounting, no root)."""
    src = Path(preset)
    target = f"{image}@@{esp_offset(image)}"
    subprocess.run(["mcopy", "-o", "-i", target, str(src), f"::{name}"], check=True,
                   env={**os.environ, "MTOOLS_SKIP_CHECK": "1"})


@dataclass
class VM:
    """One qemu guest booted from a scratch copy of a Hearth image."""

    image: Path
    firmware: str = "uefi"
    disk_size: str | None = None
    memory: str = "2G"
    cpus: int = 2
    port: int | None = None
    lan: str | None = None
    mac: str | None = None
    credentials: dict[str, str] = field(default_factory=dict)
    workdir: Path | None = None
    accel: str = "auto"
    proc: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    """Power cycles after an early kernel panic (see recover_from_early_panic)."""
    _tmp: tempfile.TemporaryDirectory[str] | None = None
    _seen: int = 0

    @property
    def serial_log(self) -> Path:
        """The guest's serial console, as written so far."""
        assert self.workdir
        return self.workdir / "serial.log"

    @property
    def serial_socket(self) -> Path:
        """Unix socket of the serial console, for driving the wizard interactively."""
        assert self.workdir
        return self.workdir / "serial.sock"

    @property
    def disk(self) -> Path:
        """The scratch copy of the image this guest boots from."""
        assert self.workdir
        return self.workdir / "disk.raw"

    def prepare(self) -> None:
        """Make the scratch disk (grown to disk_size) and firmware variables, once; no qemu yet."""
        if self.workdir is not None and self.disk.exists():
            return
        if self.workdir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="hearth-vm-")
            self.workdir = Path(self._tmp.name)
        self.workdir.mkdir(parents=True, exist_ok=True)
        subprocess.run(["cp", "--sparse=always", "--reflink=auto", str(self.image), str(self.disk)], check=True)
        if self.disk_size:
            size = _size(self.disk_size)
            if size > self.disk.stat().st_size:
                os.truncate(self.disk, size)
        if self.firmware == "uefi":
            shutil.copyfile(OVMF_VARS, self.workdir / "vars.fd")

    def command(self) -> list[str]:
        """The qemu command line for this guest."""
        assert self.workdir
        kvm = kvm_works() if self.accel == "auto" else self.accel == "kvm"
        cmd = ["qemu-system-x86_64", "-machine", "q35", "-m", self.memory, "-smp", str(self.cpus),
               "-display", "none", "-vga", "none", "-nodefaults", "-no-user-config"]
        cmd += ["-accel", "kvm", "-cpu", "host"] if kvm else ["-accel", "tcg", "-cpu", "max"]
        if self.firmware == "uefi":
            cmd += ["-drive", f"if=pflash,format=raw,readonly=on,file={OVMF_CODE}",
                    "-drive", f"if=pflash,format=raw,file={self.workdir / 'vars.fd'}"]
        elif self.firmware != "bios":
            raise QemuError(f"firmware must be uefi or bios, not {self.firmware!r}")
        cmd += ["-drive", f"if=none,id=disk,format=raw,file={self.disk},cache=unsafe,discard=unmap",
                "-device", "virtio-blk-pci,drive=disk,bootindex=1"]
        cmd += ["-chardev", f"socket,id=ser0,path={self.serial_socket},server=on,wait=off,logfile={self.serial_log}",
                "-serial", "chardev:ser0",
                "-monitor", f"unix:{self.workdir / 'monitor.sock'},server=on,wait=off"]
        user = "user,id=net0"
        if self.port:
            user += f",hostfwd=tcp:127.0.0.1:{self.port}-:8080"
        cmd += ["-netdev", user, "-device", "virtio-net-pci,netdev=net0"]
        if self.lan:
            mac = self.mac or "52:54:00:" + ":".join(f"{b:02x}" for b in os.urandom(3))
            if self.lan.startswith("unix:"):
                # unix:LOCAL:REMOTE - a two-guest LAN over datagram sockets (no host multicast needed).
                _, local, remote = self.lan.split(":", 2)
                netdev = (f"dgram,id=lan0,local.type=unix,local.path={local},"
                          f"remote.type=unix,remote.path={remote}")
            else:
                netdev = f"socket,id=lan0,mcast={self.lan}"  # every guest on this group:port shares the LAN
            cmd += ["-netdev", netdev, "-device", f"virtio-net-pci,netdev=lan0,mac={mac}"]
        cmd += ["-device", "virtio-rng-pci"]
        for name, value in self.credentials.items():
            cmd += ["-smbios", f"type=11,value=io.systemd.credential:{name}={value}"]
        return cmd

    def start(self) -> VM:
        """Prepare the disk and start qemu in the background."""
        self.prepare()
        assert self.workdir
        self._seen = 0
        self.proc = subprocess.Popen(self.command(), stdin=subprocess.DEVNULL,
                                     stdout=open(self.workdir / "qemu.log", "wb"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while not self.serial_log.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise QemuError(f"qemu did not start: {(self.workdir / 'qemu.log').read_text(errors='replace')}")
            time.sleep(0.1)
        return self

    def log(self) -> bytes:
        """Everything the guest wrote to its serial console so far."""
        return self.serial_log.read_bytes() if self.serial_log.exists() else b""

    def wait_for(self, pattern: str | bytes | re.Pattern[bytes], timeout: float,
                 since_last: bool = True) -> re.Match[bytes]:
        """Wait until the serial log matches a regex (after the previous match); raise QemuError on timeout."""
        regex = pattern if isinstance(pattern, re.Pattern) else re.compile(
            pattern.encode() if isinstance(pattern, str) else pattern)
        deadline = time.monotonic() + timeout
        while True:
            data = self.log()
            match = regex.search(data, self._seen if since_last else 0)
            if match:
                self._seen = match.end()
                return match
            if self.proc and self.proc.poll() is not None:
                raise QemuError(f"qemu exited ({self.proc.returncode}) before {regex.pattern!r}:\n{self.tail()}")
            if b"Kernel panic - not syncing" in data:
                if self.recover_from_early_panic():
                    continue
                raise QemuError(f"the guest kernel panicked before {regex.pattern!r}:\n{self.tail()}")
            if time.monotonic() > deadline:
                raise QemuError(f"no {regex.pattern!r} on the serial console after {timeout:.0f}s:\n{self.tail()}")
            time.sleep(0.5)

    def recover_from_early_panic(self, most: int = 2) -> bool:
        """Power-cycle a guest whose kernel panicked before leaving the initrd; True if it was restarted.

        Under TCG with several vCPUs (MTTCG) and -cpu max, the guest kernel now and then dies of an int3
        Oops while it patches its own code at boot: an emulator hazard, not Hearth's. Before the switch
        to the real root nothing on the disk has changed, so a power cycle is a clean retry (at most
        *most* times; the panicked console log is kept as serial.panicN.log)."""
        data = self.log()
        if b"Kernel panic - not syncing" not in data or b"initrd-switch-root" in data or self.restarts >= most:
            return False
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.restarts += 1
        self.serial_log.rename(self.serial_log.with_name(f"serial.panic{self.restarts}.log"))
        print(f"qemu.py: the guest kernel panicked during early boot (a TCG hazard); power-cycling it "
              f"({self.restarts}/{most})", file=sys.stderr, flush=True)
        self.start()
        return True

    def tail(self, lines: int = 40) -> str:
        """The last lines of the serial log (for error messages)."""
        return "\n".join(self.log().decode(errors="replace").splitlines()[-lines:])

    def monitor(self, command: str) -> str:
        """Send one human-monitor command and return its reply."""
        assert self.workdir
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(5)
            s.connect(str(self.workdir / "monitor.sock"))
            s.recv(4096)
            s.sendall(command.encode() + b"\n")
            time.sleep(0.2)
            return s.recv(65536).decode(errors="replace")

    def powerdown(self, timeout: float = 60) -> int:
        """Ask the guest to power off (ACPI), kill it if it does not within timeout; qemu's exit code."""
        if not self.proc or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        try:
            self.monitor("system_powerdown")
            return self.proc.wait(timeout)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            return self.proc.wait()

    def close(self) -> None:
        """Stop qemu and remove the scratch files (unless a workdir was given)."""
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if self._tmp:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> VM:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


def _preset(args: argparse.Namespace) -> int:
    put_preset(Path(args.image), args.preset)
    return 0


def _vm_from_args(args: argparse.Namespace, credentials: dict[str, str]) -> VM:
    return VM(Path(args.image), firmware="bios" if args.bios else "uefi", disk_size=args.disk_size,
              memory=args.memory, cpus=args.cpus, port=args.port, lan=args.lan,
              workdir=Path(args.workdir) if args.workdir else None, credentials=credentials)


def _boot(args: argparse.Namespace) -> int:
    """Boot with the serial console on this terminal (Ctrl-] quits) until the guest powers off."""
    vm = _vm_from_args(args, {})
    if args.preset:
        vm.prepare()
        put_preset(vm.disk, args.preset)
    with vm:
        print(f"hearth-qemu: {vm.firmware}, serial log {vm.serial_log}"
              + (f", API at http://127.0.0.1:{args.port}/v1" if args.port else ""), file=sys.stderr)
        return subprocess.call(["socat", "-,raw,echo=0,escape=0x1d", f"UNIX-CONNECT:{vm.serial_socket}"])


def _check(args: argparse.Namespace) -> int:
    """Boot with the hearth.check credential, wait for the check unit's verdict, return its exit code."""
    vm = _vm_from_args(args, {"hearth.check": args.mode})
    if args.preset:
        vm.prepare()
        put_preset(vm.disk, args.preset)
    started = time.monotonic()
    with vm:
        try:
            verdict = vm.wait_for(CHECK_VERDICT, args.timeout)
        except QemuError as e:
            print(f"hearth-qemu: {e}", file=sys.stderr)
            return 124
        print(f"hearth-qemu: verdict after {time.monotonic() - started:.0f}s:", file=sys.stderr)
        for line in vm.log().decode(errors="replace").splitlines():
            if "hearth-check:" in line:
                print(line.strip(), file=sys.stderr)
        vm.powerdown()
        return int(verdict.group(1))


def main(argv: list[str] | None = None) -> int:
    """The command line (see the module docstring)."""
    parser = argparse.ArgumentParser(prog="ci/qemu.py", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    for name, func in (("boot", _boot), ("check", _check)):
        p = sub.add_parser(name)
        p.set_defaults(func=func)
        p.add_argument("image")
        fw = p.add_mutually_exclusive_group()
        fw.add_argument("--uefi", action="store_true", help="boot with OVMF (default)")
        fw.add_argument("--bios", action="store_true", help="boot with SeaBIOS (legacy BIOS, grub)")
        p.add_argument("--disk-size", help="grow the scratch disk to this size (e.g. 8G)")
        p.add_argument("--memory", default="2G")
        p.add_argument("--cpus", type=int, default=2)
        p.add_argument("--port", type=int, help="forward 127.0.0.1:PORT to the guest's 8080")
        p.add_argument("--lan", help="virtual LAN with other VMs: GROUP:PORT (multicast) or unix:LOCAL:REMOTE")
        p.add_argument("--preset", help="a hearth.yaml to put on the image's FAT partition")
        p.add_argument("--workdir", help="keep the scratch disk and logs here")
    sub.choices["check"].add_argument("--mode", default="full poweroff", help="hearth.check credential value")
    sub.choices["check"].add_argument("--timeout", type=float, default=1200)
    p = sub.add_parser("preset")
    p.set_defaults(func=_preset)
    p.add_argument("image")
    p.add_argument("preset")
    sub.add_parser("accel").set_defaults(func=lambda a: print("kvm" if kvm_works() else "tcg") or 0)
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
