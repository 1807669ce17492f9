"""`nephele watch -f MANIFEST`: keep the nodes equal to the manifest, as a daemon (docs/watch.md).

Every change of the file (debounced), every commit the checkout's upstream gains (--git-poll: fetch
and fast-forward), a periodic resync (--resync, jittered) and a dark node answering again wake it up;
each pass reads the newest valid revision, observes the nodes afresh, plans and applies. Drift is
corrected (or only reported with --no-self-heal). An invalid revision is reported with FILE:LINE:COL
and the last good one stays in force. SIGTERM/SIGINT: finish the running actions, start no new one,
exit 0 (a second signal exits at once; the next start re-plans from what the nodes say).

    nephele watch -f cloudlet.yaml [--git-poll 30s] [--resync 5m] [--no-self-heal] [--events FILE]
    nephele watch -f cloudlet.yaml --once            one pass, cron-style
    nephele watch suspend -f cloudlet.yaml [instance/NAME ...]   hold reconciliation back
    nephele watch resume  -f cloudlet.yaml [instance/NAME ...]

Exit codes (--once): 0 in sync or applied, 1 error (invalid manifest, failed action, plan errors, lock
held), 2 drift found and left alone (--no-self-heal). The daemon exits 0 after a graceful stop.
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
from pathlib import Path
from typing import Any

from nephele.errors import ManifestError, NepheleError
from nephele.manifest import parse_duration
from nephele.reconcile import statedir
from nephele.reconcile.controller import read_manifest
from nephele.reconcile.observe import DEFAULT_TIMEOUT, TransportFactory
from nephele.reconcile.watch import (
    Watcher,
    WatchOptions,
    lenient_name,
    read_suspension,
    resolve_manifest,
    set_suspension,
)

TRANSPORT_FACTORY: TransportFactory | None = None  # seam for tests


def _duration(text: str) -> float:
    try:
        value = parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration (30s, 5m, 1m30s)") from exc
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: must be more than 0")
    return value


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "watch",
        help="keep the nodes equal to the manifest (file, git), correcting drift; suspend/resume",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("verb", nargs="?", choices=["suspend", "resume"], help="suspend or resume reconciliation")
    p.add_argument(
        "targets", nargs="*", metavar="instance/NAME", help="what to suspend/resume (default: all)"
    )
    p.add_argument(
        "-f", "--file", required=True, metavar="MANIFEST", help="the manifest, or a directory holding it"
    )
    p.add_argument("--once", action="store_true", help="one pass, then exit (cron-style)")
    p.add_argument(
        "--git-poll",
        type=_duration,
        metavar="INTERVAL",
        help="fetch the checkout's upstream this often and fast-forward to it (e.g. 30s)",
    )
    p.add_argument(
        "--resync",
        type=_duration,
        default=300.0,
        metavar="INTERVAL",
        help="periodic resync (default 5m, +-10%%)",
    )
    p.add_argument("--no-self-heal", action="store_true", help="report drift, do not correct it")
    p.add_argument(
        "--events", type=Path, metavar="FILE", help="JSON-lines event log (default: in the state dir)"
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT,
        metavar="SECONDS",
        help=f"per-node observe timeout (default {DEFAULT_TIMEOUT:g})",
    )
    p.add_argument(
        "--parallelism", type=int, metavar="N", help="actions at once (default: policy.parallelism)"
    )
    p.add_argument(
        "--max-backoff",
        type=_duration,
        default=60.0,
        metavar="INTERVAL",
        help="longest wait between retries of a dark node or a failed pass (default 1m)",
    )
    p.add_argument("--debounce", type=_duration, default=0.5, metavar="INTERVAL", help="file event debounce")
    p.set_defaults(func=run)


def _stamp(line: str) -> None:
    ts = dt.datetime.now(dt.UTC).strftime("%H:%M:%S")
    for part in line.splitlines() or [""]:
        print(f"{ts} {part}", flush=True)


def run(args: argparse.Namespace) -> int:
    path = resolve_manifest(args.file)
    if args.verb:
        return _suspend(args.verb, path, args.targets)
    if args.targets:
        raise NepheleError("targets are only for `nephele watch suspend|resume`")
    if args.parallelism is not None and args.parallelism < 1:
        raise NepheleError("--parallelism must be at least 1")
    opts = WatchOptions(
        manifest=path,
        resync=args.resync,
        git_poll=args.git_poll,
        self_heal=not args.no_self_heal,
        debounce=args.debounce,
        timeout=args.timeout,
        parallelism=args.parallelism,
        backoff_cap=args.max_backoff,
        events=args.events,
    )
    watcher = Watcher(opts, factory=TRANSPORT_FACTORY, say=print if args.once else _stamp)
    return watcher.once() if args.once else watcher.serve()


def _suspend(verb: str, path: Path, targets: list[str]) -> int:
    try:
        _, desired = read_manifest(str(path))
        name = desired.name
        known = set(desired.instances)
    except ManifestError:
        found = lenient_name(path.read_bytes()) if path.is_file() else None
        if found is None:
            raise
        name, known = found, set()
    for t in targets:
        inst = t.partition("/")[2]
        if known and t.startswith("instance/") and inst not in known:
            print(f"warning: {t} is not in the manifest (suspending it anyway)", file=sys.stderr)
    directory = statedir.state_dir(str(path), name)
    before = read_suspension(directory)
    after = set_suspension(directory, targets, verb == "suspend")
    if after.manifest:
        what = "the whole manifest is suspended"
    elif after.instances:
        what = "suspended: " + ", ".join(f"instance/{n}" for n in sorted(after.instances))
    else:
        what = "nothing is suspended"
    print(f"{verb.capitalize()}d{'' if after != before else ' (no change)'}: {what} (manifest {name}).")
    return 0
