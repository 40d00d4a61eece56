"""`hearth models` from the command line: import, list (text and JSON), rm, and one-line errors with hints."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from hearth.cli import main
from hearth.cli.models import Progress

gguf = pytest.importorskip("gguf")


def make_gguf(path: Path) -> Path:
    w = gguf.GGUFWriter(str(path), arch="llama")
    w.add_block_count(1)
    w.add_tensor("weight", np.zeros(4096, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture
def cfg(tmp_path: Path) -> Path:
    p = tmp_path / "hearth.yaml"
    p.write_text(f"state:\n  dir: {tmp_path / 'state'}\n")
    return p


def test_import_list_rm(cfg: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = make_gguf(tmp_path / "family-helper.gguf")
    assert main(["--config", str(cfg), "models", "import", str(src)]) == 0
    assert "imported family-helper (family-helper.gguf, sha256 " in capsys.readouterr().out
    assert main(["--config", str(cfg), "models", "list"]) == 0
    out = capsys.readouterr().out
    assert "family-helper" in out and "imported (not in catalogue)" in out
    assert main(["--config", str(cfg), "models", "list", "--json"]) == 0
    [m] = json.loads(capsys.readouterr().out)
    assert m["file"] == "family-helper.gguf" and m["origin"] == "imported" and len(m["sha256"]) == 64
    assert main(["--config", str(cfg), "models", "rm", "family-helper"]) == 0
    assert "removed " in capsys.readouterr().out
    assert main(["--config", str(cfg), "models", "list", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == []


def test_catalogue_listing(cfg: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--config", str(cfg), "models", "list", "--catalogue", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {"gemma3-270m", "qwen2.5-7b-instruct", "llama3.2-3b-instruct"} <= {r["name"] for r in rows}
    assert all(r["stored"] is False for r in rows)


@pytest.mark.parametrize("argv, message, hint", [
    (["models", "import", "/nonexistent.gguf"], "no such file", "give the path of a .gguf file"),
    (["models", "pull", "not-a-model"], "no model 'not-a-model' in the catalogue", "catalogue name"),
    (["models", "rm", "ghost"], "no model 'ghost' in the store", "hearth models list"),
])
def test_errors_are_one_line_with_a_hint(cfg: Path, capsys: pytest.CaptureFixture[str], argv, message, hint) -> None:
    assert main(["--config", str(cfg), *argv]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("hearth: error: ") and message in err[0]
    assert err[1].startswith("hint: ") and hint in err[1]


def test_progress_plain_lines_when_not_a_tty(capsys: pytest.CaptureFixture[str]) -> None:
    import io

    buf = io.StringIO()
    bar = Progress("pulling x", stream=buf, interval=3600)
    bar(0, 100, 0.0)
    bar(50, 100, 10.0)  # within the interval: quiet
    bar(100, 100, 10.0)
    bar(100, 100, 10.0)  # the end is said once
    lines = buf.getvalue().splitlines()
    assert lines == ["pulling x: 0.0% (0 B of 100 B, 0 B/s)", "pulling x: 100.0% (100 B of 100 B, 10 B/s)"]
