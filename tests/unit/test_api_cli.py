"""``hearth status``, ``hearth chat`` and ``hearth apikey`` against a real HTTP server with a fake router."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvicorn
import yaml

from hearth.api.app import create_app
from hearth.api.testing import FakeRouter, FakeRuntime
from hearth.cli import main
from hearth.config import Config


@contextlib.contextmanager
def serving(tmp_path: Path, port: int, **settings: object) -> Iterator[tuple[FakeRuntime, Path]]:
    cfg_path = tmp_path / "hearth.yaml"
    cfg_path.write_text(yaml.safe_dump({"api": {"port": port, "host": "127.0.0.1"},
                                        "state": {"dir": str(tmp_path / "state")}}))
    runtime = FakeRuntime(tmp_path / "state", config=Config().replace(**{"api.port": port, **settings}),
                          router=FakeRouter(words=("Hi", " there", "!")))
    server = uvicorn.Server(uvicorn.Config(create_app(runtime), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.01)
    try:
        yield runtime, cfg_path
    finally:
        server.should_exit = True
        thread.join(10)


@pytest.fixture
def node(tmp_path: Path, free_port: int) -> Iterator[tuple[FakeRuntime, Path]]:
    with serving(tmp_path, free_port) as n:
        yield n


def test_status_ready_and_json(node: tuple[FakeRuntime, Path], capsys: pytest.CaptureFixture[str]) -> None:
    runtime, cfg = node
    assert main(["--config", str(cfg), "status"]) == 0
    out = capsys.readouterr().out
    assert "status" in out and "ready" in out and "/v1" in out and "fake" in out
    assert main(["--config", str(cfg), "status", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["health"]["status"] == "ready" and data["models"] == ["fake", "fake-embed"]
    runtime.status = "loading"
    assert main(["--config", str(cfg), "status"]) == 3
    assert "loading" in capsys.readouterr().out


def test_status_when_no_agent_runs(tmp_path: Path, free_port: int, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "hearth.yaml"
    cfg.write_text(yaml.safe_dump({"api": {"port": free_port}, "state": {"dir": str(tmp_path)}}))
    assert main(["--config", str(cfg), "status"]) == 1
    err = capsys.readouterr().err
    assert f"the agent is not running on 127.0.0.1:{free_port}" in err
    assert "hint: start it: systemctl start hearth-agent or hearth agent" in err


def test_chat_one_shot_streams(node: tuple[FakeRuntime, Path], capsys: pytest.CaptureFixture[str]) -> None:
    runtime, cfg = node
    assert main(["--config", str(cfg), "chat", "--temperature", "0", "--max-tokens", "5", "Say", "hi"]) == 0
    assert capsys.readouterr().out == "Hi there!\n"
    req = runtime.router.records[-1].request
    assert req.model == "fake" and req.messages == ({"role": "user", "content": "Say hi"},)
    assert (req.temperature, req.max_tokens) == (0, 5)


def test_chat_conversation_keeps_history(node: tuple[FakeRuntime, Path], capsys: pytest.CaptureFixture[str],
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    runtime, cfg = node
    lines = iter(["hello", "and again", ""])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    monkeypatch.setattr("sys.stdin.isatty", lambda: True)
    assert main(["--config", str(cfg), "chat", "--model", "fake", "--system", "Be kind"]) == 0
    second = runtime.router.records[-1].request.messages
    assert [m["role"] for m in second] == ["system", "user", "assistant", "user"]
    assert second[2]["content"] == "Hi there!"
    assert capsys.readouterr().out.count("Hi there!") == 2


def test_chat_unknown_model(node: tuple[FakeRuntime, Path], capsys: pytest.CaptureFixture[str]) -> None:
    _, cfg = node
    assert main(["--config", str(cfg), "chat", "--model", "nope", "hi"]) == 1
    err = capsys.readouterr().err
    assert "model 'nope' is not served" in err and "hint: hearth status" in err


def test_keys_when_loopback_is_closed(tmp_path: Path, free_port: int, capsys: pytest.CaptureFixture[str]) -> None:
    with serving(tmp_path, free_port, **{"api.open_loopback": False}) as (runtime, cfg):
        url = f"http://127.0.0.1:{free_port}"
        assert main(["--config", str(cfg), "chat", "--url", url, "--key", "hearth-wrong", "hi"]) == 1
        err = capsys.readouterr().err
        assert "wants an API key" in err and "hint: pass --key or set HEARTH_API_KEY" in err
        # On the node itself the CLI reads the node's own key file.
        assert main(["--config", str(cfg), "chat", "hi"]) == 0
        assert capsys.readouterr().out == "Hi there!\n"


def test_apikey_commands(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "hearth.yaml"
    cfg.write_text(yaml.safe_dump({"state": {"dir": str(tmp_path / "state")}}))
    assert main(["--config", str(cfg), "apikey"]) == 1
    assert "no API keys yet" in capsys.readouterr().err
    assert main(["--config", str(cfg), "apikey", "create", "laptop"]) == 0
    key = capsys.readouterr().out.strip()
    assert key.startswith("hearth-")
    assert main(["--config", str(cfg), "apikey", "show", "laptop"]) == 0
    assert capsys.readouterr().out.strip() == key
    assert main(["--config", str(cfg), "apikey", "list", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [k["name"] for k in listed] == ["laptop"] and key not in listed[0]["key"]
    assert main(["--config", str(cfg), "apikey", "revoke", "laptop"]) == 0
    assert main(["--config", str(cfg), "apikey", "revoke", "laptop"]) == 1
    assert "no key named 'laptop'" in capsys.readouterr().err
