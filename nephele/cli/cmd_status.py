"""`nephele status -f MANIFEST`: per instance, the desired and the actual node and state, and one
condition: Ready, Progressing (an apply or a handoff is working on it), Degraded (differs from the
manifest, or the last apply failed on it; the error is shown) or Unknown (its node does not answer).

Also: the manifest's revision (git commit, and whether the file has uncommitted changes, when it is in a
git work tree; else its sha256), the last applied and last attempted revision, and a running apply.
Reads the nodes (in parallel) and the state directory; changes nothing. Exit 0 when every instance is
Ready, 1 otherwise (or on error), so scripts can wait on it.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict
from typing import Any

from nephele.reconcile import locks
from nephele.reconcile.controller import Controller
from nephele.reconcile.journal import FILE as JOURNAL_FILE
from nephele.reconcile.journal import interrupted, read_events
from nephele.reconcile.observe import DEFAULT_TIMEOUT, TransportFactory
from nephele.reconcile.status import instance_statuses, render_json, render_text, status_dict
from nephele.reconcile.watch import describe_state, read_state

TRANSPORT_FACTORY: TransportFactory | None = None  # seam for tests


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "status",
        help="desired vs actual per instance, with conditions and the last applied revision",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("-f", "--file", required=True, metavar="MANIFEST", help="the manifest; '-' reads stdin")
    p.add_argument("-o", "--output", choices=["text", "json"], default="text", help="output format")
    p.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT,
        metavar="SECONDS",
        help=f"per-node timeout (default {DEFAULT_TIMEOUT:g})",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    ctl = Controller.open(args.file, factory=TRANSPORT_FACTORY, timeout=args.timeout)
    try:
        observed = ctl.observe(remember=False)
    finally:
        ctl.close()
    record = ctl.read_status()
    lock = locks.read(ctl.directory)
    running = lock is not None and not locks.is_stale(lock)
    in_flight: set[str] = set()
    if running:
        # The journal names action ids ("kind:address[@node]"); status speaks of addresses.
        for it in interrupted(read_events(ctl.directory / JOURNAL_FILE)):
            in_flight.add(it.action.split(":", 1)[-1].split("@", 1)[0])
    instances = instance_statuses(
        ctl.desired,
        observed,
        errors=record.get("errors") or {},
        in_flight=in_flight,
        apply_running=running,
    )
    doc = status_dict(
        ctl.desired,
        observed,
        instances,
        record,
        asdict(lock) if lock else None,
        ctl.path,
        ctl.revision(),
    )
    watch = read_state(ctl.directory)  # the watch daemon's own record (docs/watch.md), if one ran
    doc["watch"] = watch
    text = render_text(doc, instances)
    if watch is not None:
        text += "\n" + "\n".join(describe_state(watch)) + "\n"
    print(render_json(doc) if args.output == "json" else text, end="")
    return 0 if doc["ready"] else 1
