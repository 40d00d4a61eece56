"""The engine's stop-string handling (pure functions; the token loop itself is tested with real models)."""

from __future__ import annotations

from hearth.serving.engine import _find_stop, _partial_stop


def test_find_stop_earliest_of_several() -> None:
    assert _find_stop("abc STOP def END", ("END", "STOP")) == 4
    assert _find_stop("nothing here", ("END",)) is None


def test_partial_stop_holds_back_a_possible_start() -> None:
    assert _partial_stop("hello wor", ("world!",)) == 3
    assert _partial_stop("hello w", ("world", "wx")) == 1
    assert _partial_stop("hello", ("world",)) == 0
    assert _partial_stop("xab", ("abc", "bcd")) == 2
