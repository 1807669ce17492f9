"""`nephele plan -f MANIFEST`: show what apply would change on the nodes, and why.

Reads the manifest, observes every node live (in parallel, --timeout per node; a node that does not
answer is shown as unreachable) or reads a recorded observation (--observed STATE.json), diffs them
and prints a Terraform-style plan (or, with -o json, the versioned plan JSON of docs/plan.md). The
inventory is the manifest's state directory's (see docs/apply.md) unless --inventory names one. Plan
changes nothing, on the nodes or in the state directory.

Exit codes: 0 success (with --detailed-exitcode: no changes), 1 error (bad input, or a plan with
errors: port held by a foreign VM, transfer budget exceeded, ...), 2 changes (--detailed-exitcode only).
-out FILE saves the plan with the manifest's hash for a later `nephele apply FILE`; a plan with errors
is never saved.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from nephele import manifest
from nephele.errors import ManifestError, PlanError, Problem
from nephele.model import Inventory, Observed
from nephele.reconcile import planfile
from nephele.reconcile.controller import Controller
from nephele.reconcile.observe import DEFAULT_TIMEOUT, TransportFactory
from nephele.reconcile.plan import PlanOptions, plan
from nephele.reconcile.render import render_json, render_text

TRANSPORT_FACTORY: TransportFactory | None = None  # seam for tests: how node transports are made


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "plan",
        help="show what apply would change, and why (Terraform-style diff)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("-f", "--file", required=True, metavar="MANIFEST", help="the manifest; '-' reads stdin")
    p.add_argument(
        "--observed",
        metavar="STATE.json",
        help="plan against this recorded observation of the nodes (format nephele.observed/v1) "
        "instead of observing them live",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT,
        metavar="SECONDS",
        help=f"per-node timeout for live observation (default {DEFAULT_TIMEOUT:g})",
    )
    p.add_argument(
        "--inventory",
        metavar="INVENTORY.json",
        help="what nephele created for this manifest (only those objects may be pruned)",
    )
    p.add_argument("-out", "--out", dest="out", metavar="PLANFILE", help="save the plan for a later apply")
    p.add_argument("-o", "--output", choices=["text", "json"], default="text", help="output format")
    p.add_argument(
        "--detailed-exitcode",
        action="store_true",
        help="exit 0 when nothing changes, 2 when the plan has changes (1 stays: error)",
    )
    p.add_argument(
        "--target",
        action="append",
        default=[],
        metavar="KIND/NAME",
        help="plan only this object (instance/, image/, snapshot/, node/NAME) and what it needs; repeatable",
    )
    p.add_argument(
        "--ignore-transfer-budget",
        action="store_true",
        help="plan handoffs even when they exceed policy.transferBudget (reported as a warning)",
    )
    p.set_defaults(func=run)


def _read_json(path: str, what: str) -> Any:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise PlanError(f"{path}: cannot read the {what}: {exc.strerror or exc}") from exc
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PlanError(f"{path}: the {what} is not valid JSON: {exc}") from exc


def read_observed(path: str) -> Observed:
    data = _read_json(path, "observed state")
    try:
        if not isinstance(data, dict):
            raise TypeError("expected a JSON object with 'format' and 'nodes'")
        return Observed.from_dict(data)
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        detail = f"missing field {exc}" if isinstance(exc, KeyError) else str(exc)
        raise PlanError(f"{path}: not a nephele observed state: {detail}") from exc


def read_inventory(path: str) -> Inventory:
    data = _read_json(path, "inventory")
    try:
        if not isinstance(data, dict):
            raise TypeError("expected a JSON object with 'manifest' and 'entries'")
        return Inventory.from_dict(data)
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        detail = f"missing field {exc}" if isinstance(exc, KeyError) else str(exc)
        raise PlanError(f"{path}: not a nephele inventory: {detail}") from exc


def run(args: argparse.Namespace) -> int:
    try:
        raw = sys.stdin.buffer.read() if args.file == "-" else Path(args.file).read_bytes()
    except OSError as exc:
        raise ManifestError(
            [Problem(args.file, 1, 1, "", f"cannot read the file: {exc.strerror or exc}")]
        ) from exc
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ManifestError([Problem(args.file, 1, 1, "", "the file is not UTF-8 text")]) from exc
    desired = manifest.loads(text, "<stdin>" if args.file == "-" else args.file)
    if args.observed is None:
        ctl = Controller.from_parts(args.file, raw, desired, factory=TRANSPORT_FACTORY, timeout=args.timeout)
        try:
            observed = ctl.observe(remember=False)
        finally:
            ctl.close()
        stored = ctl.inventory.reconcile(observed, save=False) if not args.inventory else None
    else:
        observed = read_observed(args.observed)
        stored = None
    inventory = read_inventory(args.inventory) if args.inventory else stored
    options = PlanOptions(targets=tuple(args.target), ignore_transfer_budget=args.ignore_transfer_budget)
    result = plan(desired, observed, inventory, options)
    sha = planfile.manifest_hash(raw)
    result = replace(
        result, meta={"manifest_path": args.file, "manifest_sha256": sha, "observed": args.observed or "live"}
    )
    print(render_json(result) if args.output == "json" else render_text(result), end="")
    if result.errors:
        return 1
    if args.out:
        planfile.save(args.out, planfile.SavedPlan(result, args.file, sha))
        note = f"Saved the plan to {args.out}: `nephele apply {args.out}` will perform exactly these actions."
        print(
            f"\n{note}" if args.output == "text" else note,
            file=sys.stdout if args.output == "text" else sys.stderr,
        )
    if args.detailed_exitcode and result.has_changes:
        return 2
    return 0
