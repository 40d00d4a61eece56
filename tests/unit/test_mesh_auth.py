"""Signed mesh requests: signatures, the timestamp window and the nonce cache."""

from __future__ import annotations

import pytest

from hearth.mesh import auth

KEY = auth.derive_key(b"k" * 32)


def _signed(**kw):
    args = {"method": "POST", "path": "/mesh/v1/generate", "body": b'{"a":1}', "node": "n1"} | kw
    return args, auth.sign_request(KEY, args["method"], args["path"], args["body"], args["node"])


def test_good_request_verifies_and_names_sender():
    args, headers = _signed()
    assert auth.Verifier(KEY).verify(args["method"], args["path"], args["body"], headers) == "n1"


def test_keys_differ_per_household_and_purpose():
    assert auth.derive_key(b"a" * 32) != auth.derive_key(b"b" * 32)
    assert auth.derive_key(b"a" * 32) != auth.derive_key(b"a" * 32, b"other purpose")


@pytest.mark.parametrize("change", ["method", "path", "body", "node"])
def test_any_change_breaks_the_signature(change):
    args, headers = _signed()
    tampered = dict(args, **{"method": "GET", "path": "/mesh/v1/state", "body": b'{"a":2}', "node": "n2"})
    v = auth.Verifier(KEY)
    if change == "node":
        headers = dict(headers, **{auth.H_NODE: "n2"})
        with pytest.raises(auth.AuthError) as e:
            v.verify(args["method"], args["path"], args["body"], headers)
    else:
        call = dict(args, **{change: tampered[change]})
        with pytest.raises(auth.AuthError) as e:
            v.verify(call["method"], call["path"], call["body"], headers)
    assert e.value.status == 403


def test_other_household_and_unsigned_are_refused():
    args, headers = _signed()
    with pytest.raises(auth.AuthError) as e:
        auth.Verifier(auth.derive_key(b"z" * 32)).verify(args["method"], args["path"], args["body"], headers)
    assert e.value.status == 403
    with pytest.raises(auth.AuthError) as e:
        auth.Verifier(KEY).verify("GET", "/mesh/v1/state", b"", {})
    assert e.value.status == 401 and "unsigned" in e.value.message


def test_replay_is_refused():
    args, headers = _signed()
    v = auth.Verifier(KEY)
    v.verify(args["method"], args["path"], args["body"], headers)
    with pytest.raises(auth.AuthError, match="replayed") as e:
        v.verify(args["method"], args["path"], args["body"], headers)
    assert e.value.status == 403


def test_timestamp_window():
    v = auth.Verifier(KEY, window_s=30)
    h = auth.sign_request(KEY, "GET", "/p", b"", "n", ts=1000)
    assert v.verify("GET", "/p", b"", h, now=1029) == "n"
    h = auth.sign_request(KEY, "GET", "/p", b"", "n", ts=1000)
    with pytest.raises(auth.AuthError, match="clock") as e:
        v.verify("GET", "/p", b"", h, now=1031)
    assert e.value.status == 401
    h = auth.sign_request(KEY, "GET", "/p", b"", "n", ts=1100)
    with pytest.raises(auth.AuthError, match="clock"):
        v.verify("GET", "/p", b"", h, now=1000)


def test_nonce_cache_forgets_after_two_windows_and_stays_bounded():
    cache = auth.NonceCache(window_s=30, max_size=100)
    assert cache.add("a" * 16, now=0)
    assert not cache.add("a" * 16, now=10)
    assert cache.add("a" * 16, now=61)  # by now the timestamp check refuses the old request anyway
    for i in range(500):
        cache.add(f"{i:032d}", now=100)
    assert len(cache) <= 100


def test_answers_are_bound_to_the_request_nonce():
    sig = auth.sign_answer(KEY, "nonce-1", "n1", b"{}")
    assert auth.verify_answer(KEY, "nonce-1", "n1", b"{}", sig)
    assert not auth.verify_answer(KEY, "nonce-2", "n1", b"{}", sig)
    assert not auth.verify_answer(KEY, "nonce-1", "n2", b"{}", sig)
    assert not auth.verify_answer(KEY, "nonce-1", "n1", b"{ }", sig)
    assert not auth.verify_answer(KEY, "nonce-1", "n1", b"{}", None)
