"""Every model family in the catalogue, through its own chat template, in the real llama-server: the template
describes the tools, renders a tool call and its result, and llama.cpp finds tool-call support in it.

The templates are the real ones llama.cpp keeps for these families (vendor/llama.cpp/models/templates in the
runtime's source, read from the cached sdist) and Hearth's own for Gemma GGUFs without one. The weights do
not matter for rendering, so a generated tiny GGUF stands in and every server starts in about a second.
"""

from __future__ import annotations

import asyncio
import json
import tarfile
from pathlib import Path
from typing import Any

import pytest

from hearth.serving.llamaserver import ServerProcess, ServerSpec, templates_dir

pytestmark = pytest.mark.integration

CACHE = Path(__import__("os").environ.get("HEARTH_CACHE") or Path.home() / ".cache" / "hearth")
FAMILIES = {
    "qwen2.5": "Qwen-Qwen2.5-7B-Instruct.jinja",
    "qwen3": "Qwen-Qwen3-0.6B.jinja",
    "llama3.1": "meta-llama-Llama-3.1-8B-Instruct.jinja",
    "llama3.2": "meta-llama-Llama-3.2-3B-Instruct.jinja",
    "mistral-nemo": "mistralai-Mistral-Nemo-Instruct-2407.jinja",
    "mistral-small": "Mistral-Small-3.2-24B-Instruct-2506.jinja",
    "gemma3": None,  # Hearth's own (profiles/templates/gemma.jinja)
}
TOOLS = [{"type": "function", "function": {"name": "set_light", "description": "Switch a light",
                                           "parameters": {"type": "object", "properties": {
                                               "room": {"type": "string"}, "on": {"type": "boolean"}},
                                               "required": ["room", "on"]}}}]
CALL_ID = "abc123def"  # Mistral's templates want nine alphanumerics
CONVERSATION = [
    {"role": "system", "content": "You control the house."},
    {"role": "user", "content": "Turn on the kitchen light."},
    {"role": "assistant", "content": "", "tool_calls": [{"id": CALL_ID, "type": "function", "function": {
        "name": "set_light", "arguments": json.dumps({"room": "kitchen", "on": True})}}]},
    {"role": "tool", "tool_call_id": CALL_ID, "content": "{\"ok\": true}"},
]


@pytest.fixture(scope="module")
def template_files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    sdists = sorted((CACHE / "src").glob("llama_cpp_python-*.tar.gz"))
    if not sdists:
        pytest.fail("the runtime's source (ci/runtime keeps it in $HEARTH_CACHE/src) is missing")
    out = tmp_path_factory.mktemp("templates")
    with tarfile.open(sdists[-1]) as tar:
        for member in tar.getmembers():
            if "/models/templates/" in member.name and Path(member.name).name in FAMILIES.values():
                member.name = Path(member.name).name
                tar.extract(member, out)
    return out


@pytest.mark.parametrize("family", sorted(FAMILIES))
async def test_family_template_renders_tools_calls_and_results(family: str, template_files: Path, tiny_gguf: Path,
                                                               tmp_path: Path, llama_runtime: Any) -> None:
    name = FAMILIES[family]
    template = template_files / name if name else templates_dir() / "gemma.jinja"
    assert template.is_file(), template
    spec = ServerSpec(name=family, model_path=tiny_gguf, socket_path=tmp_path / "t.sock", context=256, threads=1)
    spec.chat_format = ""
    server = ServerProcess(spec)
    # The family's own template, exactly as a GGUF of that family would carry it.
    spec.command = ()
    original = spec.argv

    def argv() -> list[str]:
        return [*original(), "--chat-template-file", str(template)]

    spec.argv = argv  # type: ignore[method-assign]
    server.start()
    try:
        assert await server.wait_ready(60), server.error
        caps = server.info["template_caps"]
        assert caps.get("supports_tool_calls") or caps.get("supports_tools"), caps
        async with server.client(30) as client:
            r = await client.post("/apply-template", json={"messages": CONVERSATION, "tools": TOOLS})
            assert r.status_code == 200, r.text
            prompt = r.json()["prompt"]
        assert "set_light" in prompt and "Switch a light" in prompt, prompt  # the tool is described
        assert "kitchen" in prompt and prompt.count("set_light") >= 2, prompt  # and its call is rendered
        assert CALL_ID in prompt or "ok" in prompt  # the tool result, tied to its call where the family does
    finally:
        await server.stop()
        await asyncio.sleep(0)
