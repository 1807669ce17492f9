"""`nephele validate -f FILE [-o json]`: check a manifest and report every problem at once.

Clean: one summary line on stdout, exit 0. Problems: each as FILE:LINE:COL: path: message on stderr
(or, with -o json, a JSON list of {file, line, col, path, message} on stdout; `[]` when clean), exit 1.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from typing import Any

from nephele import manifest
from nephele.errors import ManifestError, Problem
from nephele.model import Desired


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "validate",
        help="check a manifest (schema and cross-references) and report every problem",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("-f", "--file", required=True, metavar="FILE", help="the manifest; '-' reads stdin")
    p.add_argument("-o", "--output", choices=["text", "json"], default="text", help="output format")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        if args.file == "-":
            desired = manifest.loads(sys.stdin.read(), "<stdin>")
        else:
            desired = manifest.load(args.file)
    except ManifestError as exc:
        if args.output == "json":
            print(json.dumps([_problem_dict(p) for p in exc.problems], indent=2))
        else:
            for problem in exc.problems:
                print(problem, file=sys.stderr)
            n = len(exc.problems)
            print(f"{n} problem{'s' if n != 1 else ''} found", file=sys.stderr)
        return 1
    if args.output == "json":
        print("[]")
    else:
        print(f"{desired.source}: valid ({summary(desired)})")
    return 0


def summary(desired: Desired) -> str:
    counts = [
        (len(desired.nodes), "node"),
        (len(desired.images), "image"),
        (len(desired.snapshots), "snapshot"),
        (len(desired.instances), "instance"),
    ]
    return ", ".join(f"{n} {word}{'s' if n != 1 else ''}" for n, word in counts)


def _problem_dict(problem: Problem) -> dict[str, Any]:
    return asdict(problem)
