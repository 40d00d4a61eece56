"""A small client for a node's API, used by ``hearth status`` and ``hearth chat`` (on the node or a laptop).

Failures become one-line HearthErrors with a hint: the agent not running, a missing key, a refusal.
"""

from __future__ import annotations

import ipaddress
import json
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from ..config import Config
from ..errors import HearthError

if TYPE_CHECKING:
    import httpx

START_HINT = "start it: systemctl start hearth-agent or hearth agent"


class AgentError(HearthError):
    """The agent could not be reached or refused the request."""


def local_url(config: Config) -> str:
    """The URL of this machine's agent: loopback unless the API listens on one address only."""
    host = config.api.host
    try:
        addr = ipaddress.ip_address(host)
        if addr.is_unspecified or addr.is_loopback:
            host = "127.0.0.1"
        elif addr.version == 6:
            host = f"[{host}]"
    except ValueError:
        pass
    return f"http://{host}:{config.api.port}"


def local_key(config: Config) -> str | None:
    """A key for the local agent: $HEARTH_API_KEY, else the node's own default key when readable."""
    if os.environ.get("HEARTH_API_KEY"):
        return os.environ["HEARTH_API_KEY"]
    from .keys import DEFAULT_NAME, ApiKeyError, KeyStore, keys_path

    try:
        return KeyStore(keys_path(config.state.dir)).get(DEFAULT_NAME).key
    except ApiKeyError:
        return None


class AgentClient:
    """Talks to one node's API."""

    def __init__(self, url: str, key: str | None = None, timeout: float = 5.0) -> None:
        self.url = url.rstrip("/")
        self.key = key
        self.timeout = timeout

    @property
    def where(self) -> str:
        """host:port, for messages."""
        return self.url.split("://", 1)[-1]

    def _client(self, streaming: bool = False) -> httpx.Client:
        import httpx

        headers = {"Authorization": f"Bearer {self.key}"} if self.key else {}
        # A streamed answer may pause (a queue, a long prompt): only connecting is bounded then.
        timeout = httpx.Timeout(self.timeout, read=None) if streaming else httpx.Timeout(self.timeout)
        return httpx.Client(base_url=self.url, headers=headers, timeout=timeout, trust_env=False)

    def _fail(self, exc: Exception) -> AgentError:
        import httpx

        if isinstance(exc, httpx.ConnectError):
            return AgentError(f"the agent is not running on {self.where}", hint=START_HINT)
        if isinstance(exc, httpx.TimeoutException):
            return AgentError(f"the agent on {self.where} did not answer in time",
                              hint="it may be busy loading a model; try again, or see journalctl -u hearth-agent")
        return AgentError(f"talking to the agent on {self.where} failed: {exc}")

    def _refusal(self, status: int, text: str) -> AgentError:
        message = _error_message(text) or f"HTTP {status}"
        if status == 401:
            return AgentError(f"the agent on {self.where} wants an API key: {message}",
                              hint="pass --key or set HEARTH_API_KEY (on the node: hearth apikey show)")
        if status == 404 and "model" in message:
            return AgentError(message, hint="hearth status shows the models served")
        return AgentError(f"the agent refused: {message}")

    def get(self, path: str, ok: tuple[int, ...] = (200,)) -> tuple[int, Any]:
        """GET *path* as JSON; statuses outside *ok* are errors."""
        import httpx

        try:
            with self._client() as c:
                r = c.get(path)
        except httpx.HTTPError as e:
            raise self._fail(e) from None
        if r.status_code not in ok:
            raise self._refusal(r.status_code, r.text)
        try:
            return r.status_code, r.json()
        except ValueError:
            raise AgentError(f"{self.where}{path} did not answer JSON: is it a Hearth agent?") from None

    def stream_chat(self, body: dict[str, Any]) -> Iterator[str]:
        """POST a streamed chat completion and yield its text as it comes; closing it stops the generation."""
        import httpx

        try:
            with self._client(streaming=True) as c, c.stream("POST", "/v1/chat/completions",
                                                        json={**body, "stream": True}) as r:
                if r.status_code != 200:
                    raise self._refusal(r.status_code, r.read().decode("utf-8", "replace"))
                for line in r.iter_lines():
                    if not line.startswith("data: "):
                        continue
                    data = line[6:]
                    if data == "[DONE]":
                        return
                    chunk = json.loads(data)
                    if "error" in chunk:
                        raise AgentError(f"the answer broke off: {chunk['error'].get('message')}")
                    for choice in chunk.get("choices", ()):
                        text = choice.get("delta", {}).get("content")
                        if text:
                            yield text
        except httpx.HTTPError as e:
            raise self._fail(e) from None


def _error_message(text: str) -> str:
    try:
        err = json.loads(text).get("error")
    except (ValueError, AttributeError):
        return text.strip()[:200]
    if isinstance(err, dict):
        return str(err.get("message", ""))
    return str(err or "")
