"""``hearth household``: create a household, show its join code, join one, show which one this node is in."""

from __future__ import annotations

import argparse

from .common import add_json_flag, load_config, print_json


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``household`` subcommand."""
    p = sub.add_parser("household", help="create or join the household (the nodes that trust each other)")
    hs = p.add_subparsers(dest="action", metavar="ACTION")
    c = hs.add_parser("create", help="make a new household secret on this node")
    c.add_argument("--force", action="store_true", help="replace this node's household (peers must join again)")
    hs.add_parser("invite", help="print the join code another node types to join")
    j = hs.add_parser("join", help="join a household with a code from 'hearth household invite'")
    j.add_argument("code", help="the join code (HRTH-XXXX-...)")
    j.add_argument("--peer", metavar="URL", help="check the code live against this node first (http://IP:8080)")
    j.add_argument("--force", action="store_true", help="leave this node's current household")
    s = hs.add_parser("show", help="which household this node belongs to")
    add_json_flag(s)
    p.set_defaults(func=run, action=None)


def run(args: argparse.Namespace) -> int:
    """Run one household action."""
    from ..errors import UsageError
    from ..mesh import household

    state = load_config(args).state.dir
    if args.action == "create":
        hh = household.create(state, force=args.force)
        print(f"created household {hh.id}")
        print("join code for other nodes (also: hearth household invite):")
        print(household.invite(state))
    elif args.action == "invite":
        print(household.invite(state))
    elif args.action == "join":
        if args.peer:
            hh = household.join_via_peer(state, args.code, args.peer, force=args.force)
        else:
            hh = household.join(state, args.code, force=args.force)
        print(f"joined household {hh.id}; restart the agent to meet its peers")
    elif args.action == "show":
        current = household.load(state)
        if args.json:
            print_json({"household": current.id if current else None, "state_dir": str(state)})
        elif current is None:
            print("this node has no household yet: 'hearth household create' or 'hearth household join CODE'")
        else:
            print(f"household {current.id}")
    else:
        raise UsageError("say what to do: create, invite, join CODE or show", hint="hearth household --help")
    return 0
