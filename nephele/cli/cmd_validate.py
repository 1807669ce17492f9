"""`nephele validate -f FILE [-o json]`: check a manifest and report every problem at once.

Clean: one summary line on stdout, exit 0. Problems: each as FILE:LINE:COL: path: message on stderr,
followed by the source line with a caret under the spot (--brief: without), exit 1. With -o json: a JSON
list of {file, line, col, path, message} on stdout (`[]` when clean).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
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
    p.add_argument("--brief", action="store_true", help="one line per problem, without the source line")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    text: str | None = None
    try:
        if args.file == "-":
            text = sys.stdin.read()
            desired = manifest.loads(text, "<stdin>")
        else:
            desired = manifest.load(args.file)
    except ManifestError as exc:
        if args.output == "json":
            print(json.dumps([asdict(p) for p in exc.problems], indent=2))
            return 1
        if text is None and not args.brief:
            text = _read(args.file)
        lines = text.splitlines() if text is not None and not args.brief else []
        print(format_problems(exc.problems, lines), file=sys.stderr)
        n = len(exc.problems)
        print(f"{n} problem{'s' if n != 1 else ''} found", file=sys.stderr)
        return 1
    if args.output == "json":
        print("[]")
    else:
        print(f"{desired.source}: valid ({summary(desired)})")
    return 0


def format_problems(problems: Sequence[Problem], lines: Sequence[str] = ()) -> str:
    """One line per problem; with the source `lines`, each is followed by its line and a caret."""
    out: list[str] = []
    width = len(str(max((p.line for p in problems), default=0)))
    for p in problems:
        out.append(str(p))
        if 1 <= p.line <= len(lines):
            # Tabs become one space each, so that the caret stays under the right character.
            source = lines[p.line - 1].replace("\t", " ")
            out.append(f"  {p.line:>{width}} | {source}".rstrip())
            out.append(f"  {'':>{width}} | {' ' * (p.col - 1)}^")
    return "\n".join(out)


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None  # the problems already say why; show them without source lines


def summary(desired: Desired) -> str:
    counts = [
        (len(desired.nodes), "node"),
        (len(desired.images), "image"),
        (len(desired.snapshots), "snapshot"),
        (len(desired.instances), "instance"),
    ]
    return ", ".join(f"{n} {word}{'s' if n != 1 else ''}" for n, word in counts)
