"""Join codes, household files and node identity."""

from __future__ import annotations

import os
import stat

import pytest

from hearth.mesh import household, identity


def test_code_round_trips_and_reads_forgivingly(tmp_path):
    hh = household.create(tmp_path)
    code = household.invite(tmp_path)
    assert code.startswith("HRTH-")
    assert all(len(g) == 4 for g in code.split("-"))
    assert household.verify_code(code) == hh.secret
    # lower case, spaces instead of dashes, and O/I/L typed for 0/1 still read the same
    sloppy = code.lower().replace("-", " ").replace("0", "o").replace("1", "l")
    assert household.verify_code(sloppy) == hh.secret


def test_every_single_character_typo_is_caught(tmp_path):
    code = household.code_for(os.urandom(32))
    body = code.replace("-", "")[4:]
    for pos in range(len(body)):
        for repl in "0Z":
            if body[pos] == repl:
                continue
            typo = body[:pos] + repl + body[pos + 1:]
            with pytest.raises(household.InvalidCode, match="mistyped"):
                household.verify_code(typo)


def test_swapped_groups_and_bad_lengths_are_caught():
    code = household.code_for(os.urandom(32))
    groups = code.split("-")
    swapped = "-".join([groups[0], groups[2], groups[1], *groups[3:]])
    if swapped != code:
        with pytest.raises(household.InvalidCode):
            household.verify_code(swapped)
    with pytest.raises(household.InvalidCode, match="characters after HRTH"):
        household.verify_code("-".join(groups[:-1]))
    with pytest.raises(household.InvalidCode, match="never in a code: U"):
        household.verify_code(code[:-1] + "U")


def test_household_file_is_private_and_join_refuses_switching(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    household.create(a)
    assert stat.S_IMODE(household.path_of(a).stat().st_mode) == 0o600
    with pytest.raises(household.HouseholdError, match="already belongs"):
        household.create(a)
    joined = household.join(b, household.invite(a))
    assert joined == household.load(a)
    household.create(tmp_path / "c")
    with pytest.raises(household.HouseholdError, match="another household"):
        household.join(b, household.invite(tmp_path / "c"))
    assert household.join(b, household.invite(tmp_path / "c"), force=True) == household.load(tmp_path / "c")


def test_invite_without_household_says_what_to_do(tmp_path):
    with pytest.raises(household.HouseholdError) as e:
        household.invite(tmp_path)
    assert "household create" in (e.value.hint or "")


def test_identity_is_made_once_private_and_stable(tmp_path):
    first = identity.load_or_create(tmp_path)
    path = tmp_path / identity.IDENTITY_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    again = identity.load_or_create(tmp_path)
    assert again.node_id == first.node_id and len(first.node_id) == 16
    assert first.default_name == f"hearth-{first.node_id[:4]}"
    other = identity.load_or_create(tmp_path / "other")
    assert other.node_id != first.node_id
    sig = first.sign(b"x")
    assert identity.verify_signature(first.public_bytes, sig, b"x")
    assert not identity.verify_signature(other.public_bytes, sig, b"x")


def test_damaged_identity_is_a_clear_error(tmp_path):
    (tmp_path / identity.IDENTITY_FILE).write_text("garbage")
    with pytest.raises(identity.IdentityError, match="damaged"):
        identity.load_or_create(tmp_path)


def test_household_functions_import_nothing_heavy():
    """The first-boot wizard calls these: no zeroconf, FastAPI or httpx until the network is really used."""
    import subprocess
    import sys

    code = ("import sys, hearth.mesh.household, hearth.mesh.identity, hearth.mesh.auth; "
            "print(sorted(m for m in ('httpx', 'zeroconf', 'fastapi') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
