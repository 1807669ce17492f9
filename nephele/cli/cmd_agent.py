"""`nephele agent call`: the node-side entry point of the agent protocol (docs/agent-protocol.md).
Reads one JSON request on stdin, writes one JSON response on stdout, progress on stderr."""

from __future__ import annotations

import argparse
import sys
from typing import Any


def _call(args: argparse.Namespace) -> int:
    from nephele.agent.server import serve_one

    return serve_one(sys.stdin.buffer, sys.stdout.buffer, sys.stderr)


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
    sup = sub.add_parser("supervise", help="watch one instance: a user pause captures a snapshot (internal)")
    sup.add_argument("uuid")
    sup.set_defaults(func=_supervise)
    ops = sub.add_parser("ops", help="list the ops this node answers")
    ops.set_defaults(func=_ops)
