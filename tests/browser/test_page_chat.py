"""Signing in and chatting with Gemma 3 270M through a real agent, in headless chromium.

The agent has ``api.open_loopback: false``, so this browser on loopback is treated like one across the LAN:
it must sign in with the admin password.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from pagelab import PASSWORD, set_password, shot, sign_in, wait_until


@pytest.fixture
def gemma_agent(agent_factory: Any, gemma_path: Path, llama_runtime: Any) -> Any:
    """A real agent serving Gemma 3 270M, closed to unsigned browsers even on loopback."""
    agent = agent_factory(gemma_path, api__open_loopback=False, model__context=2048)
    set_password(agent.state_dir)
    return agent


def _answer(page: Any) -> str:
    return str(page.eval_on_selector_all(".msg.assistant", "els => els.length ? els[els.length - 1].innerText : ''"))


def _watch_stream(page: Any, min_chars: int = 40, timeout: float = 90.0) -> list[int] | None:
    """The assistant's text length at each look, until it has *min_chars* while still streaming; None when
    the model ended its answer before that."""
    lengths: list[int] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        n = len(_answer(page))
        if n and (not lengths or n != lengths[-1]):
            lengths.append(n)
        if n >= min_chars and len(lengths) >= 3:
            return lengths
        if page.is_visible("#send"):
            return None  # finished: a short answer
        page.wait_for_timeout(30)
    raise AssertionError(f"the answer did not stream: lengths seen {lengths}")


def _stream_long_answer(page: Any, min_chars: int) -> list[int]:
    """Watch the answer being streamed; a model that stops early (sampling is random) is asked again."""
    for _ in range(4):
        lengths = _watch_stream(page, min_chars)
        if lengths is not None:
            return lengths
        page.click("#regenerate")
        page.wait_for_selector("#stop", state="visible")
    raise AssertionError("every answer ended before it could be watched streaming")


def test_a_wrong_password_is_refused(gemma_agent: Any, desktop: Any) -> None:
    page = desktop.new_page()
    page.goto(gemma_agent.url + "/")
    page.wait_for_selector("#signin-form", state="visible")
    assert page.is_hidden("#chat"), "the chat must not show before signing in"
    shot(page, "signin-desktop")
    page.fill("#password", "not the password")
    page.click("#signin-form button[type=submit]")
    wait_until(page, "document.getElementById('signin-error').textContent.length > 0")
    assert page.inner_text("#signin-error") == "wrong password"
    assert page.is_visible("#signin-form") and page.is_hidden("#chat")
    assert not [c for c in desktop.cookies() if c["name"] == "hearth_session"]


def test_sign_in_then_stream_stop_and_regenerate_a_gemma_answer(gemma_agent: Any, desktop: Any, phone: Any) -> None:
    page = desktop.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(gemma_agent.url + "/")
    sign_in(page)
    page.wait_for_selector("#chat", state="visible")
    cookie = next(c for c in desktop.cookies() if c["name"] == "hearth_session")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    assert page.evaluate("document.cookie") == "", "the session cookie is out of JavaScript's reach"

    model = gemma_agent.model
    wait_until(page, f"[...document.querySelectorAll('#model option')].some(o => o.value === {model!r})")
    label = page.eval_on_selector("#model", "s => s.selectedOptions[0].textContent")
    assert model in label and "on " in label, f"the model is marked with where it runs: {label!r}"

    page.click("#toggle-system")
    page.fill("#system", "You are a helpful assistant in a family home.")
    page.dispatch_event("#system", "change")
    page.fill("#prompt", "Write a short story about a cat who lives by the fire.")
    page.press("#prompt", "Enter")
    page.wait_for_selector("#stop", state="visible")
    lengths = _stream_long_answer(page, min_chars=160)
    # Markdown may shorten the text as a token closes a mark-up (** turning bold): growth overall is the test.
    assert lengths[-1] > lengths[0] and len(set(lengths)) >= 3, f"tokens arrive one after another: {lengths}"
    shot(page, "chat-desktop")
    page.click("#stop")
    page.wait_for_selector("#send", state="visible")
    wait_until(page, "document.querySelector('.msg.assistant .meta')?.textContent.includes('stopped')")
    stopped = _answer(page)
    page.wait_for_timeout(500)
    assert _answer(page) == stopped, "nothing arrives after Stop"
    assert page.is_visible("#regenerate")

    page.click("#regenerate")
    page.wait_for_selector("#stop", state="visible")
    _stream_long_answer(page, min_chars=20)
    page.click("#stop")
    page.wait_for_selector("#send", state="visible")
    assert page.locator(".msg.assistant").count() == 1, "regenerate replaces the last answer"

    # Conversations are kept in this browser: a reload shows it again, with its system prompt.
    page.reload()
    page.wait_for_selector(".msg.user")
    assert "cat who lives by the fire" in page.inner_text(".msg.user")
    assert page.input_value("#system") == "You are a helpful assistant in a family home."
    assert "a short story about a cat" in page.inner_text("#chat-list")
    assert not errors, errors

    # The same on a phone: sign in, and the chat fits the screen (no sideways scrolling).
    mobile = phone.new_page()
    mobile.goto(gemma_agent.url + "/")
    sign_in(mobile, PASSWORD)
    mobile.wait_for_selector("#chat", state="visible")
    mobile.fill("#prompt", "Name three things a family can cook together.")
    mobile.click("#send")
    _stream_long_answer(mobile, min_chars=20)
    mobile.click("#stop")
    mobile.wait_for_selector("#send", state="visible")
    assert mobile.evaluate("document.documentElement.scrollWidth <= window.innerWidth + 1")
    assert mobile.is_hidden("#chats") and mobile.is_visible("#show-chats")
    shot(mobile, "chat-phone")
