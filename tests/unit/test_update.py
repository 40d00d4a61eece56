"""A/B updates without a VM: signed SHA256SUMS (real gpg, a throwaway key), downloads from a folder, over
HTTP and from a household peer's read-only route, tampering refused, boot entries and the health verdict,
the BIOS refusal and the CLI's errors."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import http.server
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from hearth.cli import main
from hearth.update import apply, boot, fetch, health
from hearth.update.sums import UpdateError, check_file, load_verified, parse_sums, releases, verify_signature

pytestmark = pytest.mark.skipif(shutil.which("gpg") is None or shutil.which("gpgv") is None,
                                reason="gpg and gpgv are installed by image/host-deps")
USR = "a" * 32
VERITY = "b" * 32


def _gpg(home: Path, *args: str, data: bytes | None = None) -> bytes:
    return subprocess.run(["gpg", "--homedir", str(home), "--batch", "--yes", "--passphrase", "", *args],
                          input=data, check=True, capture_output=True).stdout


@functools.cache
def _keys(base: str) -> dict[str, Path]:
    """A publisher key and a stranger's key, each in its own GnuPG home, made once per session."""
    out: dict[str, Path] = {}
    for who in ("publisher", "stranger"):
        home = Path(base) / who
        home.mkdir(mode=0o700, parents=True)
        _gpg(home, "--quick-gen-key", f"{who} <{who}@hearth.invalid>", "ed25519", "sign", "never")
        (Path(base) / f"{who}.gpg").write_bytes(_gpg(home, "--export", f"{who}@hearth.invalid"))
        out[who] = home
        out[f"{who}.keyring"] = Path(base) / f"{who}.gpg"
    return out


@pytest.fixture(scope="session")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path]]:
    made = _keys(str(tmp_path_factory.mktemp("gnupg")))
    yield made
    for who in ("publisher", "stranger"):  # gpg leaves an agent running per home
        subprocess.run(["gpgconf", "--homedir", str(made[who]), "--kill", "gpg-agent"], check=False)


def publish(folder: Path, version: str, keys: dict[str, Path], signer: str = "publisher") -> dict[str, bytes]:
    """Write one release (random bytes standing in for the artifacts), SHA256SUMS and its signature."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {f"hearth_{version}.efi": os.urandom(3000),
             f"hearth_{version}.usr.{USR}.raw.xz": os.urandom(200_000),
             f"hearth_{version}.usr-verity.{VERITY}.raw.xz": os.urandom(5000)}
    for name, data in files.items():
        (folder / name).write_bytes(data)
    listed = sorted(p.name for p in folder.glob("hearth_*"))
    (folder / "SHA256SUMS").write_text("".join(
        f"{hashlib.sha256((folder / n).read_bytes()).hexdigest()}  {n}\n" for n in listed))
    _gpg(keys[signer], "--detach-sign", "--output", str(folder / "SHA256SUMS.gpg"), str(folder / "SHA256SUMS"))
    return files


def test_sums_format_is_strict() -> None:
    good = "0" * 64 + "  hearth_2.efi\n" + "1" * 64 + " *hearth_2.usr." + USR + ".raw.xz\n"
    assert parse_sums(good) == {"hearth_2.efi": "0" * 64, f"hearth_2.usr.{USR}.raw.xz": "1" * 64}
    for bad in ("", "nothex  hearth_2.efi\n", "0" * 64 + "  ../etc/passwd\n", "0" * 64 + "  /abs\n",
                "0" * 64 + "  a.efi\n" + "1" * 64 + "  a.efi\n"):
        with pytest.raises(UpdateError):
            parse_sums(bad)


def test_only_complete_releases_count() -> None:
    sums = {"hearth_2.efi": "0" * 64, f"hearth_2.usr.{USR}.raw.xz": "1" * 64,
            f"hearth_2.usr-verity.{VERITY}.raw.xz": "2" * 64, "hearth_3.efi": "3" * 64, "README": "4" * 64}
    assert list(releases(sums)) == ["2"]
    assert releases(sums)["2"].files["hearth_2.efi"] == "0" * 64


def test_signature_good_tampered_and_foreign(tmp_path: Path, keys: dict[str, Path]) -> None:
    publish(tmp_path / "r", "2", keys)
    sums, sig = tmp_path / "r" / "SHA256SUMS", tmp_path / "r" / "SHA256SUMS.gpg"
    verify_signature(sums, sig, keys["publisher.keyring"])
    assert "hearth_2.efi" in load_verified(tmp_path / "r", keys["publisher.keyring"])
    with pytest.raises(UpdateError, match="unknown key"):
        verify_signature(sums, sig, keys["stranger.keyring"])
    text = sums.read_text()
    sums.write_text(text.replace(text[0], "f" if text[0] != "f" else "e", 1))
    with pytest.raises(UpdateError, match="bad signature"):
        verify_signature(sums, sig, keys["publisher.keyring"])
    with pytest.raises(UpdateError, match="no update key"):
        verify_signature(sums, sig, tmp_path / "missing.gpg")


def test_download_from_folder_and_tampered_artifact(tmp_path: Path, keys: dict[str, Path]) -> None:
    ring = keys["publisher.keyring"]
    files = publish(tmp_path / "pub", "2", keys)
    src = fetch.Source(f"file://{tmp_path / 'pub'}", "publisher")
    assert fetch.download([src], tmp_path / "state", "2", keyring=ring) is None  # already on 2
    rel = fetch.download([src], tmp_path / "state", "1", keyring=ring)
    assert rel is not None and rel.version == "2"
    verified = tmp_path / "state" / "updates" / "verified"
    for name, data in files.items():
        assert (verified / name).read_bytes() == data
    assert fetch.stored(tmp_path / "state", ring) == rel
    # One byte changed in an artifact, SHA256SUMS (and its signature) untouched: refused, store unchanged.
    publish(tmp_path / "pub3", "3", keys)
    usr = tmp_path / "pub3" / f"hearth_3.usr.{USR}.raw.xz"
    data = bytearray(usr.read_bytes())
    data[1000] ^= 0x01
    usr.write_bytes(bytes(data))
    with pytest.raises(UpdateError, match="SHA-256"):
        fetch.download([fetch.Source(f"file://{tmp_path / 'pub3'}", "pub3")], tmp_path / "state", "2", keyring=ring)
    assert not (verified / usr.name).exists()
    assert fetch.stored(tmp_path / "state", ring) == rel
    # The store itself changed behind the node's back no longer counts as a release.
    (verified / "hearth_2.efi").write_bytes(b"x")
    assert fetch.stored(tmp_path / "state", ring) is None
    with pytest.raises(UpdateError, match="SHA-256"):
        check_file(verified / "hearth_2.efi", rel.files["hearth_2.efi"])


@contextlib.contextmanager
def http_folder(folder: Path) -> Iterator[str]:
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    handler.log_message = lambda *a: None  # type: ignore[assignment,method-assign]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        thread.join(5)


def test_download_over_http_with_progress_and_a_leftover_partial(tmp_path: Path, keys: dict[str, Path]) -> None:
    files = publish(tmp_path / "pub", "2", keys)
    usr = f"hearth_2.usr.{USR}.raw.xz"
    # A power cut left half a file (with wrong bytes) in incoming/: it is not trusted.
    incoming = tmp_path / "state" / "updates" / "incoming"
    incoming.mkdir(parents=True)
    (incoming / usr).write_bytes(b"\0" * 1000)
    seen: dict[str, int] = {}
    with http_folder(tmp_path / "pub") as url:
        rel = fetch.download([fetch.Source(url, url)], tmp_path / "state", "1",
                             progress=lambda n, done, total: seen.__setitem__(n, done), keyring=keys["publisher.keyring"])
    assert rel is not None and rel.version == "2"
    assert seen[usr] == len(files[usr])
    assert (tmp_path / "state" / "updates" / "verified" / usr).read_bytes() == files[usr]
    assert not incoming.exists()


def test_peer_route_serves_verified_files_read_only(tmp_path: Path, keys: dict[str, Path], free_port: int) -> None:
    import uvicorn
    from fastapi import FastAPI

    from hearth.mesh.auth import Verifier, derive_key
    from hearth.mesh.client import signed_headers
    from hearth.update.serve import make_router

    ring = keys["publisher.keyring"]
    files = publish(tmp_path / "pub", "2", keys)
    peer_state = tmp_path / "peer"
    assert fetch.download([fetch.Source(f"file://{tmp_path / 'pub'}", "pub")], peer_state, "1", keyring=ring)
    key = derive_key(b"s" * 32)
    app = FastAPI()
    app.include_router(make_router(Verifier(key), peer_state))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.01)
    base = f"http://127.0.0.1:{free_port}/mesh/v1/updates"
    try:
        import httpx

        assert httpx.get(f"{base}/SHA256SUMS", trust_env=False).status_code == 401  # not a household member
        stranger = derive_key(b"x" * 32)
        url = f"{base}/SHA256SUMS"
        assert httpx.get(url, headers=signed_headers(stranger, "n2", "GET", url), trust_env=False).status_code in (401, 403)
        for name in ("hearth.yaml", "..%2Fincoming", "last"):
            u = f"{base}/{name}"
            assert httpx.get(u, headers=signed_headers(key, "n2", "GET", u), trust_env=False).status_code == 404
        u = f"{base}/hearth_2.efi"
        assert httpx.put(u, content=b"x", headers=signed_headers(key, "n2", "PUT", u, b"x"),
                         trust_env=False).status_code == 405

        def sign(method: str, target: str) -> dict[str, str]:
            return signed_headers(key, "n2", method, target)

        peer = fetch.Source(base, "peer", sign)
        rel = fetch.download([peer], tmp_path / "me", "1", keyring=ring)
        assert rel is not None and rel.version == "2"
        name = f"hearth_2.usr-verity.{VERITY}.raw.xz"
        assert (tmp_path / "me" / "updates" / "verified" / name).read_bytes() == files[name]
        # A peer whose copy was changed (one byte) cannot pass it on: the receiver checks the signed hash.
        served = peer_state / "updates" / "verified" / name
        data = bytearray(served.read_bytes())
        data[0] ^= 0xFF
        served.write_bytes(bytes(data))
        with pytest.raises(UpdateError, match="SHA-256"):
            fetch.download([peer], tmp_path / "other", "1", keyring=ring)
        assert not (tmp_path / "other" / "updates" / "verified").exists()
    finally:
        server.should_exit = True
        thread.join(10)


def test_boot_entries_counting_and_fallback(tmp_path: Path) -> None:
    assert boot.parse_entry("hearth_3+2-1.efi") == boot.Entry("hearth_3+2-1.efi", "3", 2, 1)
    assert boot.parse_entry("hearth_3+3.efi") == boot.Entry("hearth_3+3.efi", "3", 3, 0)
    assert boot.parse_entry("hearth_2.efi").state == "good"  # type: ignore[union-attr]
    assert boot.parse_entry("hearth_3+0-3.efi").state == "bad"  # type: ignore[union-attr]
    assert boot.parse_entry("linux.efi") is None
    esp = tmp_path / "esp"
    (esp / "EFI" / "Linux").mkdir(parents=True)
    for name in ("hearth_2.efi", "hearth_10+2-1.efi", "hearth_9.efi", "other.efi"):
        (esp / "EFI" / "Linux" / name).write_bytes(b"")
    assert [e.version for e in boot.entries(esp)] == ["10", "9", "2"]
    assert health.decide(esp, "hearth_10+2-1.efi") == "rollback"
    assert health.decide(esp, "hearth_10.efi") == "rollback"  # systemd-boot's id has no counter
    assert health.decide(esp, "hearth_9.efi") == "stay"  # blessed: a bad verdict is not an update's fault
    (esp / "EFI" / "Linux" / "hearth_9.efi").unlink()
    (esp / "EFI" / "Linux" / "hearth_2.efi").rename(esp / "EFI" / "Linux" / "hearth_2+0-3.efi")
    assert health.decide(esp, "hearth_10+2-1.efi") == "stay"  # nothing good to fall back to: no reboot loop
    efivars = tmp_path / "efivars"
    efivars.mkdir()
    (efivars / f"LoaderEntrySelected-{boot.LOADER_GUID}").write_bytes(
        b"\x06\x00\x00\x00" + "hearth_10+2-1.efi\0".encode("utf-16-le"))
    assert boot.selected_entry(efivars) == "hearth_10+2-1.efi"
    assert boot.selected_entry(tmp_path / "none") is None
    assert boot.version_key("1.10") > boot.version_key("1.9")


def test_health_verdict(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ok, bad = tmp_path / "ok", tmp_path / "bad"
    ok.write_text("#!/bin/sh\necho 'hearth-check: exit 0'\nexit 0\n")
    bad.write_text("#!/bin/sh\necho 'hearth-check: FAIL: no agent' >&2\necho 'hearth-check: exit 123'\nexit 123\n")
    ok.chmod(0o755)
    bad.chmod(0o755)
    assert health.verdict(str(bad), tmp_path / "not-configured")  # the wizard is still waiting: OS only
    (tmp_path / "configured").touch()
    assert health.verdict(str(ok), tmp_path / "configured")
    assert not health.verdict(str(bad), tmp_path / "configured")
    # The check's lines are relabelled, so the console never shows a second "hearth-check: exit" verdict
    # beside hearth-check.service's own on the same boot (the image tests wait for that one).
    out = capsys.readouterr().out
    assert "hearth-health: check: exit 0" in out and "hearth-health: check: FAIL: no agent" in out
    assert "hearth-check:" not in out


def test_preflight_refuses_bios_old_layout_and_full_esp(tmp_path: Path, keys: dict[str, Path],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    publish(tmp_path / "v", "2", keys)
    rel = releases(load_verified(tmp_path / "v", keys["publisher.keyring"]))["2"]
    efi = tmp_path / "fw-efi"
    efi.mkdir()
    osr = tmp_path / "os-release"
    osr.write_text('ID=debian\nIMAGE_ID="hearth"\nIMAGE_VERSION="1"\n')
    with pytest.raises(UpdateError) as e:
        apply.preflight(rel, tmp_path / "v", esp=tmp_path, sys_firmware=tmp_path / "no-efi", os_release=osr)
    assert "legacy BIOS" in e.value.message and "UEFI" in (e.value.hint or "")
    # The layout from before A/B: no IMAGE_VERSION, or /usr inside the root file system. "/" and "/proc" stand
    # for a root and a /usr on two file systems, "/" twice for one.
    old = tmp_path / "old-release"
    old.write_text("ID=debian\n")
    for release, usr in ((old, Path("/proc")), (osr, Path("/"))):
        with pytest.raises(UpdateError) as e:
            apply.preflight(rel, tmp_path / "v", esp=tmp_path, sys_firmware=efi, os_release=release, usr=usr)
        assert "cannot update in place: reflash" in e.value.message and "ci/flash" in e.value.message
        assert "\n" not in e.value.message and "hearth-var" in (e.value.hint or "")
    assert apply.preflight(rel, tmp_path / "v", esp=tmp_path, sys_firmware=efi, os_release=osr, usr=Path("/proc")) == "1"
    # A version that already failed here is not installed again; one that is installed says so.
    (tmp_path / "EFI" / "Linux").mkdir(parents=True)
    (tmp_path / "EFI" / "Linux" / "hearth_2+0-1.efi").write_bytes(b"")
    with pytest.raises(UpdateError, match="failed its health check"):
        apply.preflight(rel, tmp_path / "v", esp=tmp_path, sys_firmware=efi, os_release=osr, usr=Path("/proc"))
    (tmp_path / "EFI" / "Linux" / "hearth_2+0-1.efi").rename(tmp_path / "EFI" / "Linux" / "hearth_2+3.efi")
    with pytest.raises(UpdateError, match="already installed") as e:
        apply.preflight(rel, tmp_path / "v", esp=tmp_path, sys_firmware=efi, os_release=osr, usr=Path("/proc"))
    assert e.value.hint == "reboot to start it"
    shutil.rmtree(tmp_path / "EFI")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(256 << 20, 250 << 20, 6 << 20))  # type: ignore[attr-defined]
    with pytest.raises(UpdateError, match="ESP has 6 MiB free"):
        apply.preflight(rel, tmp_path / "v", esp=tmp_path, sys_firmware=efi, os_release=osr, usr=Path("/proc"))


def _config(tmp_path: Path, **update: object) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    cfg = tmp_path / "hearth.yaml"
    cfg.write_text(yaml.safe_dump({"state": {"dir": str(tmp_path / "state")}, "update": update,
                                   "api": {"port": 1}}))
    return cfg


def test_cli_errors_and_check(tmp_path: Path, keys: dict[str, Path], capsys: pytest.CaptureFixture[str],
                              monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = _config(tmp_path, from_peers=False)
    assert main(["--config", str(cfg), "update"]) == 2
    assert "check, apply or status" in capsys.readouterr().err
    assert main(["--config", str(cfg), "update", "check"]) == 1
    err = capsys.readouterr().err
    assert "nowhere to look for updates" in err and "update.url" in err
    bad = _config(tmp_path / "b", url="ftp://x")
    assert main(["--config", str(bad), "update", "status"]) == 2
    assert "update.url" in capsys.readouterr().err
    publish(tmp_path / "pub", "2", keys)
    monkeypatch.setattr("hearth.update.sums.KEYRING", keys["publisher.keyring"])
    monkeypatch.setattr(boot, "image_version", lambda *a: "1")
    assert main(["--config", str(cfg), "update", "check", "--from", str(tmp_path / "pub")]) == 0
    assert "version 2 is available" in capsys.readouterr().out
    # Legacy BIOS: refused before anything is downloaded.
    monkeypatch.setattr(boot, "booted_uefi", lambda *a: False)
    assert main(["--config", str(cfg), "update", "apply", "--from", str(tmp_path / "pub")]) == 1
    err = capsys.readouterr().err
    assert "legacy BIOS" in err and "hint:" in err
    assert not (tmp_path / "state" / "updates" / "verified").exists()
    assert main(["--config", str(cfg), "update", "status"]) == 0
    assert "updates: off" in capsys.readouterr().out
    # A stick with the layout from before A/B (here: this host, /usr inside /): one line saying to reflash
    # and how, before anything is downloaded.
    monkeypatch.setattr(boot, "booted_uefi", lambda *a: True)
    monkeypatch.setattr(boot, "image_version", lambda *a: None)
    assert main(["--config", str(cfg), "update", "apply", "--from", str(tmp_path / "pub")]) == 1
    err = capsys.readouterr().err.splitlines()
    assert "cannot update in place: reflash" in err[0] and "ci/flash" in err[0] and err[1].startswith("hint:")
    assert not (tmp_path / "state" / "updates" / "verified").exists()


UKIFY = Path("/usr/lib/systemd/ukify")
STUB = Path("/usr/lib/systemd/boot/efi/linuxx64.efi.stub")


@pytest.mark.skipif(not (UKIFY.exists() and STUB.exists() and Path("/usr/bin/python3").exists()),
                    reason="ukify and systemd-stub come with image/host-deps")
def test_bios_follows_the_blessed_uki(tmp_path: Path) -> None:
    from hearth.update import grub

    kernel, initrd = os.urandom(300_000), os.urandom(500_000)
    (tmp_path / "k").write_bytes(kernel)
    (tmp_path / "i").write_bytes(initrd)
    esp = tmp_path / "esp"
    (esp / "EFI" / "Linux").mkdir(parents=True)
    uki = esp / "EFI" / "Linux" / "hearth_2.efi"
    cmdline = "root=PARTLABEL=hearth-root mount.usr=/dev/mapper/usr usrhash=" + "ab" * 32 + " rw"
    subprocess.run(["/usr/bin/python3", str(UKIFY), "build", f"--linux={tmp_path / 'k'}", f"--initrd={tmp_path / 'i'}",
                    f"--cmdline={cmdline}", "--uname=6.12.0", f"--stub={STUB}", f"--output={uki}"],
                   check=True, capture_output=True)
    # mkosi's build-time files for grub, and the type 1 entry that points at them.
    (esp / "grub").mkdir()
    (esp / "grub" / "grub.cfg").write_text('set timeout=0\nif [ "${grub_platform}" = pc ]; then\nmenuentry "x" {\n'
                                           "    linux /tok/6.12.0/vmlinuz usrhash=00\n    initrd /tok/6.12.0/initrd\n}\nfi\n")
    (esp / "tok" / "6.12.0").mkdir(parents=True)
    (esp / "tok" / "6.12.0" / "vmlinuz").write_bytes(b"old")
    (esp / "loader" / "entries").mkdir(parents=True)
    (esp / "loader" / "entries" / "tok-6.12.0.conf").write_text("linux /tok/6.12.0/vmlinuz\n")
    assert grub.followed(esp) is None
    grub.follow(esp, uki, "2")
    assert (esp / "hearth-bios" / "2" / "vmlinuz").read_bytes() == kernel
    assert (esp / "hearth-bios" / "2" / "initrd").read_bytes() == initrd
    cfg = (esp / "grub" / "grub.cfg").read_text()
    assert f"linux /hearth-bios/2/vmlinuz {cmdline}\n" in cfg and "initrd /hearth-bios/2/initrd" in cfg
    assert grub.followed(esp) == "2"
    assert not (esp / "tok").exists() and not list((esp / "loader" / "entries").iterdir())
    # The next blessed version replaces this one; a file that is not a UKI changes nothing.
    shutil.copy(uki, esp / "EFI" / "Linux" / "hearth_3.efi")
    grub.follow(esp, esp / "EFI" / "Linux" / "hearth_3.efi", "3")
    assert grub.followed(esp) == "3" and not (esp / "hearth-bios" / "2").exists()
    (tmp_path / "junk.efi").write_bytes(b"MZ" + b"\0" * 100)
    with pytest.raises(UpdateError):
        grub.follow(esp, tmp_path / "junk.efi", "4")
    assert grub.followed(esp) == "3"


def test_install_reports_sysupdate_failure_in_one_line(tmp_path: Path, keys: dict[str, Path]) -> None:
    """The wrapper around systemd-sysupdate (the real one runs in the qemu chain)."""
    publish(tmp_path / "state" / "updates" / "verified", "2", keys)
    rel = releases(load_verified(tmp_path / "state" / "updates" / "verified", keys["publisher.keyring"]))["2"]
    tool = tmp_path / "sysupdate"
    tool.write_text('#!/bin/sh\necho "Selected update 2"\necho "Failed to write partition: No space left" >&2\nexit 1\n')
    tool.chmod(0o755)
    said: list[str] = []
    with pytest.raises(UpdateError) as e:
        apply.install(rel, tmp_path / "state", say=said.append, sysupdate=str(tool))
    assert "No space left" in e.value.message and "untouched" in (e.value.hint or "")
    assert said == ["  sysupdate: Selected update 2", "  sysupdate: Failed to write partition: No space left"]
    tool.write_text('#!/bin/sh\n[ "$1 $2" = "update 2" ] || exit 3\necho "Successfully installed update 2"\n')
    apply.install(rel, tmp_path / "state", say=said.append, sysupdate=str(tool))
    assert said[-1] == "  sysupdate: Successfully installed update 2"
    with pytest.raises(UpdateError, match="missing"):
        apply.install(rel, tmp_path / "state", sysupdate=str(tmp_path / "nope"))
