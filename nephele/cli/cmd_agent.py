"""`nephele agent call` / `serve`: the node-side entry points of the agent protocol
(docs/agent-protocol.md). `call` reads one JSON request on stdin and writes one JSON response on stdout;
`serve` answers newline-delimited requests until EOF (the controller keeps one per node). Progress goes
to stderr."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any


def _call(args: argparse.Namespace) -> int:
    from nephele.agent.server import serve_one

    return serve_one(sys.stdin.buffer, sys.stdout.buffer, sys.stderr)


def _serve(args: argparse.Namespace) -> int:
    from nephele.agent.daemon import DAEMON_ENV
    from nephele.agent.server import serve

    if os.environ.get(DAEMON_ENV) == "1":  # first: the daemon is forked from here, before libvirt or threads
        from nephele.agent.daemon import start_in_background
        from nephele.node.store import default_root

        start_in_background(default_root())
    # Responses get a private copy of fd 1, and fd 1 itself becomes stderr: nothing else this long-lived
    # process runs (a library's print, C code, a child process) can write into the response stream.
    sys.stdout.flush()
    responses = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    idle = args.idle_timeout if args.idle_timeout > 0 else None
    return serve(
        sys.stdin.buffer, responses, sys.stderr, idle_timeout=idle, keep_hypervisor=not args.fresh_libvirt
    )


def _ops(args: argparse.Namespace) -> int:
    from nephele.node.ops import OPS

    for name in sorted(OPS):
        print(name)
    return 0


def _supervise(args: argparse.Namespace) -> int:
    from nephele.node.supervisor import supervise

    return supervise(args.uuid)


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("agent", help="node-side agent (called by the controller over SSH)")
    sub = p.add_subparsers(dest="agent_command", required=True, metavar="ACTION")
    call = sub.add_parser("call", help="answer one request: JSON on stdin, JSON response on stdout")
    call.set_defaults(func=_call)
    serve = sub.add_parser(
        "serve", help="answer requests until EOF: one JSON line in, one JSON line out (read-only ops only)"
    )
    serve.add_argument(
        "--idle-timeout",
        type=float,
        default=120.0,
        metavar="S",
        help="exit after S seconds without a request (0: never; default 120)",
    )
    serve.add_argument(
        "--fresh-libvirt",
        action="store_true",
        help="open a libvirt connection per request instead of keeping one (for measurements)",
    )
    serve.set_defaults(func=_serve)
    sup = sub.add_parser("supervise", help="watch one instance: a user pause captures a snapshot (internal)")
    sup.add_argument("uuid")
    sup.set_defaults(func=_supervise)
    ops = sub.add_parser("ops", help="list the ops this node answers")
    ops.set_defaults(func=_ops)
