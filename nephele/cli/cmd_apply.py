"""`nephele apply -f MANIFEST`: make the nodes match the manifest. `nephele apply PLANFILE`: perform a
saved plan exactly.

With -f: take the manifest's lock, observe every node, plan, show the plan, ask for confirmation on a
terminal (Only 'yes' will be accepted; without a terminal --auto-approve is required), then act: dependencies
first, independent actions in parallel (--parallelism, default policy.parallelism), retries with backoff
for temporary errors, dependents of a failed action skipped. --dry-run stops after the plan and writes
nothing anywhere.

With PLANFILE (from `nephele plan -f MANIFEST -out PLANFILE`): refused, with nothing done, when the
manifest changed since the plan was made or when the live nodes no longer match the plan's
preconditions (StalePlanError); otherwise its actions run exactly as saved, without a question.

State (inventory, journal, lock, apply record): $NEPHELE_STATE_DIR/<manifest name>/, or
.nephele/<manifest name>/ beside the manifest. A lock left by a killed apply is broken with
`nephele force-unlock LOCK_ID -f MANIFEST`. See docs/apply.md.

Exit codes: 0 success (also: no changes), 1 error, a plan with errors, a refused or failed apply.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from dataclasses import replace
from typing import Any, TextIO

from nephele.errors import NepheleError, PlanError, StalePlanError
from nephele.reconcile import execute, locks, planfile
from nephele.reconcile.actions import Plan
from nephele.reconcile.controller import Controller
from nephele.reconcile.journal import Journal
from nephele.reconcile.observe import DEFAULT_TIMEOUT, TransportFactory
from nephele.reconcile.plan import PlanOptions, plan
from nephele.reconcile.render import render_json, render_text

CONFIRM = "Do you want to perform these actions? Only 'yes' will be accepted to approve."

# Seams for tests: how transports are made (None: SSH / local per node) and whether stdin is a terminal.
TRANSPORT_FACTORY: TransportFactory | None = None


def is_terminal() -> bool:
    return sys.stdin.isatty()


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "apply",
        help="make the nodes match the manifest (or perform a saved plan)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("planfile", nargs="?", metavar="PLANFILE", help="a plan saved by `nephele plan -out`")
    p.add_argument("-f", "--file", metavar="MANIFEST", help="the manifest; '-' reads stdin")
    p.add_argument("--auto-approve", action="store_true", help="do not ask for confirmation")
    p.add_argument("--dry-run", action="store_true", help="observe and plan only; change nothing")
    p.add_argument(
        "--target",
        action="append",
        default=[],
        metavar="KIND/NAME",
        help="apply only this object (instance/NAME, image/, snapshot/, node/) and what it needs; repeatable",
    )
    p.add_argument(
        "--parallelism", type=int, metavar="N", help="actions at once (default: policy.parallelism)"
    )
    p.add_argument("-o", "--output", choices=["text", "json"], default="text", help="output format")
    p.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT,
        metavar="SECONDS",
        help=f"per-node timeout for observing (default {DEFAULT_TIMEOUT:g})",
    )
    p.add_argument(
        "--ignore-transfer-budget",
        action="store_true",
        help="hand off even when over policy.transferBudget (reported as a warning)",
    )
    p.set_defaults(func=run)

    u = subparsers.add_parser(
        "force-unlock",
        help="break a lock left behind by a killed apply",
        description="Remove the apply lock of a manifest. Only do this when no apply is running: the "
        "lock is what keeps two applies from acting on the same nodes at once.",
    )
    u.add_argument("lock_id", metavar="LOCK_ID", help="the id printed by the apply that was refused")
    u.add_argument("-f", "--file", required=True, metavar="MANIFEST", help="the manifest")
    u.set_defaults(func=run_force_unlock)


def run_force_unlock(args: argparse.Namespace) -> int:
    ctl = Controller.open(args.file)
    info = locks.force_unlock(ctl.directory, args.lock_id)
    print(f"Removed {info.describe()}.")
    return 0


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _confirm(out: TextIO) -> bool:
    print(f"\n{CONFIRM}\n  Enter a value: ", end="", file=out, flush=True)
    try:
        answer = input()
    except EOFError:
        answer = ""
    return answer.strip() == "yes"


def run(args: argparse.Namespace) -> int:
    if args.parallelism is not None and args.parallelism < 1:
        raise PlanError("--parallelism must be at least 1")
    if bool(args.planfile) == bool(args.file):
        raise PlanError("give either -f MANIFEST or a PLANFILE (from `nephele plan -out`), not both")
    saved = planfile.load(args.planfile) if args.planfile else None
    if saved is not None and args.target:
        raise PlanError("--target cannot change a saved plan; make a new plan with --target instead")
    ctl = Controller.open(saved.manifest_path if saved else args.file, factory=TRANSPORT_FACTORY)
    ctl.timeout = args.timeout
    if saved is not None:
        planfile.check_manifest(saved, ctl.raw)
    json_out = args.output == "json"
    out = sys.stderr if json_out else sys.stdout  # progress never mixes with the JSON document

    def say(line: str) -> None:
        print(line, file=out, flush=True)

    lock = None if args.dry_run else locks.acquire(ctl.directory, ctl.desired.name, "apply")
    try:
        return _run_locked(args, ctl, saved, say, out, json_out)
    finally:
        if lock is not None:
            locks.release(ctl.directory, lock)
        ctl.close()


def _run_locked(
    args: argparse.Namespace,
    ctl: Controller,
    saved: planfile.SavedPlan | None,
    say: Any,
    out: TextIO,
    json_out: bool,
) -> int:
    journal = Journal(ctl.directory)
    if not args.dry_run:
        for it in journal.previous_interrupted():
            say(
                f"The last apply was killed while running {it.action} (attempt {it.attempt}, started "
                f"{it.since}); re-planning from what the nodes report now."
            )
    observed = ctl.observe(remember=not args.dry_run)
    if saved is not None:
        the_plan = saved.plan
        stale = planfile.stale_preconditions(the_plan, observed)
        if stale:
            raise StalePlanError(
                "the saved plan no longer matches the nodes; nothing was done. Run nephele plan again.\n  "
                + "\n  ".join(stale)
            )
    else:
        inventory = ctl.inventory.reconcile(observed, save=not args.dry_run)
        options = PlanOptions(targets=tuple(args.target), ignore_transfer_budget=args.ignore_transfer_budget)
        the_plan = plan(ctl.desired, observed, inventory, options)
        the_plan = replace(
            the_plan, meta={"manifest_path": ctl.path, "manifest_sha256": planfile.manifest_hash(ctl.raw)}
        )
    if not json_out:
        print(render_text(the_plan), end="", file=out)
    if the_plan.errors:
        if json_out:
            _emit_json(the_plan, None, args.dry_run)
        return 1
    if not the_plan.has_changes or args.dry_run:
        if args.dry_run and not json_out:
            print("\nDry run: nothing was changed.", file=out)
        if not the_plan.has_changes and not args.dry_run:
            _record(ctl, the_plan, None)
        if json_out:
            _emit_json(the_plan, None, args.dry_run)
        return 0
    if saved is None and not args.auto_approve:
        if not is_terminal():
            raise NepheleError(
                "apply needs confirmation, but stdin is not a terminal: nothing was done. "
                "Review the plan above and run again with --auto-approve."
            )
        if not _confirm(out):
            print("Apply cancelled: nothing was done.", file=out)
            return 1
    rev = ctl.revision()
    journal.begin(manifest=ctl.desired.name, revision=rev["text"], actions=[a.id for a in the_plan.actions])
    parallelism = args.parallelism or ctl.desired.policy.parallelism
    say("")
    result = None
    try:
        result = execute.apply(
            the_plan,
            ctl.desired,
            ctl.pool,
            execute.ApplyOptions(parallelism=parallelism, observe_timeout=ctl.timeout),
            journal=journal,
            inventory=ctl.inventory,
            say=say,
        )
    finally:
        journal.end(bool(result and result.ok))
    _record(ctl, the_plan, result)
    say("")
    say(result.summary_line())
    if json_out:
        _emit_json(the_plan, result, False)
    return 0 if result.ok else 1


def _record(ctl: Controller, the_plan: Plan, result: execute.ApplyResult | None) -> None:
    """The apply record (status.json): last attempted and last applied revision, last error per object."""
    rec = ctl.read_status()
    rev = ctl.revision()
    errors: dict[str, str] = dict(rec.get("errors") or {})
    ok = result is None or result.ok
    if result is not None:
        for r in result.results:
            if r.status is execute.Status.FAILED and r.error:
                errors[r.action.address] = r.error
            elif r.status in execute.OK:
                errors.pop(r.action.address, None)
    stamp = {
        "revision": rev["text"],
        "sha256": rev["sha256"],
        "git_commit": rev.get("git_commit"),
        "at": _now(),
    }
    rec["last_attempted"] = {
        **stamp,
        "ok": ok,
        "message": result.summary_line() if result is not None else "no changes",
    }
    complete = ok and not the_plan.unknown and not the_plan.targets
    if complete:
        rec["last_applied"] = stamp
        errors = {}
    rec["errors"] = errors
    ctl.write_status(rec)


def _emit_json(the_plan: Plan, result: execute.ApplyResult | None, dry_run: bool) -> None:
    doc = {
        "plan": json.loads(render_json(the_plan)),
        "dry_run": dry_run,
        "result": result.to_dict() if result is not None else None,
    }
    print(json.dumps(doc, indent=2, ensure_ascii=False))
