"""`nephele handoffs [NODE] [-f MANIFEST | --cloudlet NAME] [-o json]`: the history of live handoffs.

Each node keeps the records of the handoffs it received (`<root>/logs/handoff_from_<ip>_at_<ts>.stats`,
see docs/heatmap.md); this asks the nodes (in parallel, agent op `handoff.history`) and lists them
oldest first: when, from, to, instance, duration, downtime, bytes over the wire, outcome. The nodes come
from a manifest (-f), a local cloudlet (--cloudlet or $NEPHELE_CLOUDLET), or this machine (`local`, the
default); NODE narrows to one of them. A node that does not answer is reported on stderr and the exit
status is 1, after the others are listed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from nephele.agent.client import fan_out
from nephele.agent.transport import AgentTransport, LocalTransport
from nephele.errors import NepheleError

MiB = 1 << 20
TIMEOUT = 30.0


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "handoffs",
        help="history of live handoffs, from the nodes' records",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("node", nargs="?", metavar="NODE", help="only the handoffs this node received")
    src = p.add_mutually_exclusive_group()
    src.add_argument("-f", "--file", metavar="MANIFEST", help="the nodes of this manifest")
    src.add_argument("--cloudlet", metavar="NAME", help="the nodes of this local cloudlet")
    p.add_argument("-o", "--output", choices=["text", "json"], default="text", help="output format")
    p.add_argument("-n", "--last", type=int, default=0, metavar="N", help="only the last N handoffs")
    p.add_argument("--timeout", type=float, default=TIMEOUT, metavar="SECONDS", help="per-node timeout")
    p.set_defaults(func=run)


def _nodes(args: argparse.Namespace) -> tuple[dict[str, AgentTransport], dict[str, str]]:
    """Transports by node name, and node names by address (to show FROM as a node name)."""
    transports: dict[str, AgentTransport] = {}
    names: dict[str, str] = {}
    cloudlet = args.cloudlet or (None if args.file else os.environ.get("NEPHELE_CLOUDLET"))
    if args.file:
        from nephele.agent.nodes import transport_for_node
        from nephele.manifest import load

        desired = load(args.file)
        wanted = [args.node] if args.node else list(desired.nodes)
        for n in wanted:
            spec = desired.nodes.get(n)
            if spec is None:
                raise NepheleError(f"{args.file}: no node {n!r} (its nodes: {', '.join(desired.nodes)})")
            transports[n] = transport_for_node(spec, timeout=args.timeout)
        names = {s.address: s.name for s in desired.nodes.values()}
    elif cloudlet:
        from nephele.agent.ssh import SSHTransport
        from nephele.cloudlet import Cloudlet

        c = Cloudlet.load(cloudlet)
        picked = [n for n in c.nodes if not args.node or args.node in (n.name, n.address)]
        if not picked:
            known = ", ".join(n.name for n in c.nodes)
            raise NepheleError(f"cloudlet {cloudlet!r} has no node {args.node!r} (its nodes: {known})")
        for n in picked:
            transports[n.name] = SSHTransport(
                n.address,
                node=n.name,
                user=n.ssh_user,
                port=n.ssh_port,
                key=n.ssh_key,
                known_hosts=n.known_hosts,
                timeout=args.timeout,
            )
        names = {n.address: n.name for n in c.nodes}
    else:
        if args.node not in (None, "local"):
            raise NepheleError(
                f"node {args.node!r}: give the manifest (-f) or the cloudlet (--cloudlet) it belongs to"
            )
        transports["local"] = LocalTransport("local", timeout=args.timeout)
    return transports, names


def collect(
    transports: dict[str, AgentTransport], names: dict[str, str], timeout: float
) -> tuple[list[dict[str, Any]], list[str]]:
    """Every node's entries (with "to" = the node's name, "from_node" when the source is a known node),
    oldest first, and one problem line per node that failed or per record it could not read."""
    results = fan_out(transports, "handoff.history", {}, timeout=timeout)
    entries: list[dict[str, Any]] = []
    problems: list[str] = []
    for node, res in results.items():
        if isinstance(res, Exception):
            problems.append(f"{node}: {res}")
            continue
        for e in res.get("handoffs", []):
            e["to"] = node
            e["from_node"] = names.get(str(e.get("from")))
            entries.append(e)
        problems += [f"{node}: {err['error']}" for err in res.get("errors", [])]
    entries.sort(key=lambda e: (e["when"], e["to"], e["stats_file"]))
    return entries, problems


def _secs(v: Any) -> str:
    return "-" if v is None else f"{float(v):.1f}s" if v >= 10 else f"{float(v):.2f}s"


def render_text(entries: list[dict[str, Any]]) -> str:
    head = ["WHEN", "FROM", "TO", "INSTANCE", "DURATION", "DOWNTIME", "BYTES", "OUTCOME"]
    rows = [head]
    for e in entries:
        src = f"{e['from_node']} ({e['from']})" if e.get("from_node") else str(e["from"])
        rows.append(
            [
                str(e["when"]).replace("T", " ").removesuffix("Z"),
                src,
                str(e["to"]),
                str(e["instance"]),
                _secs(e["duration_s"]),
                _secs(e["downtime_s"]),
                f"{e['wire_bytes'] / MiB:.2f} MiB",
                str(e["outcome"]),
            ]
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    return "".join(
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() + "\n" for r in rows
    )


def run(args: argparse.Namespace) -> int:
    transports, names = _nodes(args)
    try:
        entries, problems = collect(transports, names, args.timeout)
    finally:
        for t in transports.values():
            t.close()
    if args.last > 0:
        entries = entries[-args.last :]
    for p in problems:
        print(f"warning: {p}", file=sys.stderr)
    if args.output == "json":
        print(json.dumps(entries, indent=2, sort_keys=True))
    elif entries:
        print(render_text(entries), end="")
    else:
        print("no handoffs recorded", file=sys.stderr)
    return 1 if problems else 0
