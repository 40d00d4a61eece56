"""``hearth chat``: talk to the household's model from the terminal, streaming the answer as it comes."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ..errors import UsageError
from .common import load_config


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``chat`` subcommand."""
    p = sub.add_parser("chat", help="chat with the model (one question, or a conversation when none is given)")
    p.add_argument("prompt", nargs="*", help="the question; none starts a conversation ('-' reads stdin)")
    p.add_argument("--model", "-m", help="model to use (default: the first one served)")
    p.add_argument("--system", help="system message that sets the assistant's manner")
    p.add_argument("--max-tokens", type=int, default=None, help="longest answer in tokens")
    p.add_argument("--temperature", type=float, default=None, help="sampling temperature (0 = always the likeliest)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed, for repeatable answers")
    p.add_argument("--url", help="a node's API URL (default: this machine's agent)")
    p.add_argument("--key", help="API key for a node that is not this machine (default: $HEARTH_API_KEY)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Answer one prompt, or hold a conversation until end of input."""
    from ..api.client import AgentClient, local_key, local_url

    cfg = load_config(args)
    client = AgentClient(args.url or local_url(cfg), key=args.key or (None if args.url else local_key(cfg)))
    model = args.model or _first_model(client)
    if args.max_tokens is not None and args.max_tokens < 1:
        raise UsageError("--max-tokens must be at least 1")
    options: dict[str, Any] = {"model": model}
    for name in ("max_tokens", "temperature", "seed"):
        if getattr(args, name) is not None:
            options[name] = getattr(args, name)
    history: list[dict[str, str]] = [{"role": "system", "content": args.system}] if args.system else []

    prompt = " ".join(args.prompt)
    if prompt == "-" or (not prompt and not sys.stdin.isatty()):
        prompt = sys.stdin.read().strip()
        if not prompt:
            raise UsageError("stdin was empty: nothing to ask")
    if prompt:
        _answer(client, options, [*history, {"role": "user", "content": prompt}])
        return 0
    return _converse(client, options, history, model)


def _first_model(client: Any) -> str:
    from ..api.client import AgentError

    _, models = client.get("/v1/models")
    names = [m["id"] for m in models.get("data", [])]
    if not names:
        raise AgentError("the household serves no model yet",
                         hint="hearth status shows whether the model is still loading")
    return str(names[0])


def _answer(client: Any, options: dict[str, Any], messages: list[dict[str, str]]) -> str:
    parts: list[str] = []
    stream = client.stream_chat({**options, "messages": messages})
    try:
        for text in stream:
            parts.append(text)
            sys.stdout.write(text)
            sys.stdout.flush()
    finally:
        stream.close()  # a Ctrl-C hangs up, which stops the generation on the node
        sys.stdout.write("\n")
        sys.stdout.flush()
    return "".join(parts)


def _converse(client: Any, options: dict[str, Any], history: list[dict[str, str]], model: str) -> int:
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    print(f"chatting with {model}; an empty line or Ctrl-D ends, Ctrl-C stops an answer")
    while True:
        try:
            line = input("> ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        if not line or line in ("/exit", "/quit"):
            return 0
        history.append({"role": "user", "content": line})
        try:
            reply = _answer(client, options, history)
        except KeyboardInterrupt:
            print("[stopped]")
            history.pop()
            continue
        history.append({"role": "assistant", "content": reply})
