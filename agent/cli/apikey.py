"""``hearth apikey``: show, create, list and revoke the node's API keys."""

from __future__ import annotations

import argparse
import time

from .common import add_json_flag, load_config, print_json, print_table


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``apikey`` subcommand."""
    p = sub.add_parser("apikey", help="show, create, list or revoke API keys",
                       description="API keys let clients off this machine use the API "
                                   "(Authorization: Bearer <key>). Changes apply without a restart.")
    actions = p.add_subparsers(dest="action", metavar="ACTION")
    show = actions.add_parser("show", help="print a key (default: the one made on first start)")
    show.add_argument("name", nargs="?", default="default")
    create = actions.add_parser("create", help="make a new key and print it")
    create.add_argument("name", help="what the key is for, e.g. laptop")
    lst = actions.add_parser("list", help="list the keys (masked)")
    add_json_flag(lst)
    revoke = actions.add_parser("revoke", help="remove a key; clients using it get 401")
    revoke.add_argument("name")
    p.set_defaults(func=run, action=None, name="default")


def run(args: argparse.Namespace) -> int:
    """Do the key action."""
    from ..api.keys import ApiKeyError, KeyStore, keys_path

    store = KeyStore(keys_path(load_config(args).state.dir))
    action = args.action or "show"
    if action == "show":
        if not store.path.exists():
            raise ApiKeyError("this node has no API keys yet",
                              hint="the agent makes one on its first start (systemctl start hearth-agent), "
                                   "or: hearth apikey create NAME")
        print(store.get(args.name).key)
    elif action == "create":
        print(store.create(args.name).key)
    elif action == "revoke":
        store.revoke(args.name)
        print(f"revoked '{args.name}'")
    else:
        keys = store.load()
        if getattr(args, "json", False):
            print_json([{"name": k.name, "key": k.shown, "created": k.created} for k in keys])
        else:
            print_table(("name", "key", "created"),
                        [(k.name, k.shown, time.strftime("%Y-%m-%d %H:%M", time.localtime(k.created))) for k in keys])
    return 0
