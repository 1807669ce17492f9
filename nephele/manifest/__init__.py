"""nephele.manifest: cloudlet.yaml -> a validated, typed `Desired`.

    YAML text --(yamlpos: parse, keep every key's and value's line/column)--> plain data
             --(schema: JSON Schema 2020-12, messages rewritten for humans)--> problems
             --(xref: references between nodes, images, snapshots, instances)--> problems
             --(build, only when there is no problem)--> Desired

Every problem is collected before anything is raised: `ManifestError.problems` lists them all, each
printed as `FILE:LINE:COL: path: message`.
"""

from __future__ import annotations

import copy
from pathlib import Path as FsPath
from typing import Any

from nephele.errors import ManifestError, Problem
from nephele.manifest import schema, xref
from nephele.manifest.build import build
from nephele.manifest.units import parse_duration, parse_size
from nephele.manifest.yamlpos import end_of, format_path, parse
from nephele.model import Desired

__all__ = ["check", "load", "loads", "parse_duration", "parse_size", "schema_document"]


def loads(text: str, filename: str = "<string>") -> Desired:
    """Validate manifest text; `filename` names it in problems and becomes `Desired.source`."""
    desired, problems = check(text, filename)
    if problems or desired is None:
        raise ManifestError(problems)
    return desired


def load(path: str | FsPath) -> Desired:
    """Read and validate a manifest file. Any failure, unreadable file included, is a ManifestError."""
    name = str(path)
    try:
        raw = FsPath(path).read_bytes()
    except OSError as exc:
        message = f"cannot read the file: {exc.strerror or exc}"
        raise ManifestError([Problem(name, 1, 1, "", message)]) from exc
    try:
        text = raw.decode("utf-8-sig")  # a BOM would shift line 1 by a column
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        col = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
        raise ManifestError([Problem(name, line, col, "", "the file is not UTF-8 text")]) from exc
    return loads(text, name)


def check(text: str, filename: str = "<string>") -> tuple[Desired | None, list[Problem]]:
    """(desired, []) for a valid manifest, (None, every problem) otherwise. Never raises for bad input."""
    data, positions, problems = parse(text, filename)
    if data is None:
        if not problems:  # a document that is only `~`, `null` or `---`
            # an empty node after `---` starts past the last character: report it at the end instead
            at = min((positions.value(()).line, positions.value(()).col), end_of(text))
            problems = [Problem(filename, *at, "", "the manifest is null, not a mapping")]
        return None, problems
    unreadable = {format_path(p) for p in positions.unreadable}
    later = schema.check(data, positions) + xref.check(data, positions)
    problems += [p for p in later if p.path not in unreadable]
    problems = sorted(set(problems))
    if problems:
        return None, problems
    return build(data, filename), []


def schema_document() -> dict[str, Any]:
    """The manifest's JSON Schema, as shipped in the package (a copy: changing it changes nothing)."""
    return copy.deepcopy(schema.schema())
