"""The settings table: parsing, errors that name the key and line, defaults, round trips."""

from __future__ import annotations

from pathlib import Path

import pytest

from hearth import config
from hearth.errors import ConfigError


def test_defaults_when_file_missing(tmp_path: Path) -> None:
    cfg = config.load(tmp_path / "nope.yaml")
    assert cfg.api.port == 8080
    assert cfg.models_dir == Path("/var/lib/hearth/models")


def test_parse_values_and_types() -> None:
    cfg = config.parse("node:\n  name: hearth-den\napi:\n  port: 9000\nmesh:\n  peers: [10.0.0.2, 'nas:8080']\n")
    assert cfg.node.name == "hearth-den"
    assert cfg.api.port == 9000
    assert cfg.mesh.peers == ("10.0.0.2", "nas:8080")


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("api:\n  port: 99999\n", "line 2: api.port must be a port number"),
        ("api:\n  prot: 80\n", "unknown setting 'api.prot'"),
        ("api:\n  port: eighty\n", "api.port must be a integer"),
        ("apii:\n  port: 80\n", "unknown section 'apii'"),
        ("node:\n  name: Bad_Name\n", "node.name must be 1-63"),
        ("api: [1, 2]\n", "'api' must be a mapping"),
        ("api:\n  port: 80\n   host: x\n", "not valid YAML"),
        ("- a\n- b\n", "must be a mapping of sections"),
        ("mesh:\n  enabled: maybe\n", "mesh.enabled must be a true/false"),
    ],
)
def test_bad_input_names_key_and_line(text: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as e:
        config.parse(text, "hearth.yaml")
    assert fragment in str(e.value)
    assert str(e.value).startswith("hearth.yaml")


def test_unknown_key_suggests_the_right_one() -> None:
    with pytest.raises(ConfigError) as e:
        config.parse("api:\n  prot: 80\n")
    assert e.value.hint == "did you mean 'api.port'?"


def test_numeric_string_keeps_typed_text() -> None:
    cfg = config.parse("node:\n  name: '0123'\nmodel:\n  chat_format: 0012\n")
    assert cfg.model.chat_format == "0012"


def test_frozen_and_replace() -> None:
    cfg = config.Config()
    with pytest.raises(AttributeError):
        cfg.api.port = 1  # type: ignore[misc]
    changed = cfg.replace(**{"api.port": 9001, "mesh.peers": ["a"]})
    assert changed.api.port == 9001 and changed.mesh.peers == ("a",)
    assert cfg.api.port == 8080
    with pytest.raises(ConfigError):
        cfg.replace(**{"api.port": 0})


def test_dump_round_trip(tmp_path: Path) -> None:
    cfg = config.Config().replace(**{"node.name": "hearth-7f3a", "mesh.peers": ["10.1.1.1"], "state.dir": "/srv/h"})
    path = tmp_path / "etc" / "hearth.yaml"
    config.save(cfg, path)
    assert config.load(path) == cfg
    assert "port" not in path.read_text()  # only what differs from the defaults


def test_every_setting_has_help() -> None:
    keys = [s.key for s in config.SETTINGS]
    assert len(keys) == len(set(keys))
    for row in config.SETTINGS:
        assert row.help.endswith("."), row.key
