"""The node's handoff history, read from its records: ``<root>/logs/handoff_from_<ip>_at_<ts>.stats``
(what nephele.handoff.records writes on the destination, rewritten every second while a handoff runs).

The agent op ``handoff.history`` lists one entry per .stats file, oldest first: when it started (from the
file name, UTC), from which address, which instance, how long it took, the downtime, the bytes over the
wire, the outcome (completed / failed: why / running / interrupted: a record still saying "running"
whose file stopped being refreshed, so its receiver died), the DIRTIED / BY VALUE / BY REF / ZEROS table
and the heatmap images kept beside it. This module parses the text itself: it sits below the handoff
package and must read records written by any version of it.
"""

from __future__ import annotations

import datetime as dt
import re
import time
from pathlib import Path
from typing import Any

from nephele.errors import InvalidInput
from nephele.node.runtime import NodeContext

MiB = 1 << 20
STALE_S = 10.0  # a running handoff's .stats is rewritten every second
_NAME = re.compile(r"^handoff_from_(?P<ip>.+)_at_(?P<ts>\d{8}T\d{6})\.stats$")
_HEAD = re.compile(r"^Handoff of (?P<title>.*) \[(?P<uuid>[^\]]*)\] from (?P<source>\S+)$")
_MIB = r"(-?\d+(?:\.\d+)?) MiB"
_ROW = re.compile(rf"^(MEMORY|DISK)\s+{_MIB}\s+{_MIB}\s+{_MIB}\s+{_MIB}\s*$")
COLUMNS = ("dirtied", "by_value", "by_ref", "zeros")


def parse_stats(text: str, where: str) -> dict[str, Any]:
    """One .stats text -> a dict (MiB values as floats with the file's 2 decimals); ``where`` names the
    file in errors (InvalidInput ``where:LINE: ...``)."""
    lines = text.splitlines()
    if not lines:
        raise InvalidInput(f"{where}: empty stats file")
    m = _HEAD.match(lines[0])
    if m is None:
        raise InvalidInput(
            f"{where}:1: expected 'Handoff of TITLE [UUID] from ADDRESS', got {lines[0][:80]!r}"
        )
    out: dict[str, Any] = {"title": m["title"], "uuid": m["uuid"], "source": m["source"]}
    fields: dict[str, str] = {}
    table: dict[str, dict[str, float]] = {}
    for no, line in enumerate(lines[1:], start=2):
        row = _ROW.match(line)
        if row is not None:
            table[row[1].lower()] = {c: float(v) for c, v in zip(COLUMNS, row.groups()[1:], strict=True)}
            continue
        key, sep, value = line.partition(": ")
        if sep and key and not key.startswith(" "):
            fields[key] = value.strip()
        elif line.strip() and not line.lstrip().startswith("DIRTIED"):
            raise InvalidInput(f"{where}:{no}: cannot read {line[:80]!r}")

    def number(key: str, unit: str = "", *, integer: bool = False) -> Any:
        raw = fields.get(key)
        if raw is None:
            raise InvalidInput(f"{where}: no '{key}:' line")
        mm = re.match(rf"^(-?\d+(?:\.\d+)?)\s*{re.escape(unit)}", raw)
        if mm is None:
            raise InvalidInput(f"{where}: '{key}: {raw}' is not a number{' of ' + unit if unit else ''}")
        return int(mm[1]) if integer else float(mm[1])

    out["status"] = fields.get("Status", "")
    if not out["status"]:
        raise InvalidInput(f"{where}: no 'Status:' line")
    out["iterations"] = number("Iterations", integer=True)
    out["elapsed_s"] = number("Elapsed Time", "s")
    out["disk_mib"] = number("VM Disk Size", "MiB")
    out["memory_mib"] = number("VM Memory Size", "MiB")
    out["blobs"] = number("Blobs Received", integer=True)
    out["wire_mib"] = number("Total MBytes Received over wire", "MiB")
    wire = fields.get("Total MBytes Received over wire", "")
    parts = re.search(r"\((.*)\)", wire)
    out["wire_mib_by_channel"] = {
        k: float(v) for k, v in re.findall(r"([A-Za-z_]+) (\d+(?:\.\d+)?)", parts[1] if parts else "")
    }
    down = fields.get("Downtime", "-")
    out["downtime_s"] = None if down.startswith("-") else number("Downtime", "s")
    for kind in ("memory", "disk"):
        if kind not in table:
            raise InvalidInput(
                f"{where}: no {kind.upper()} row in the DIRTIED / BY VALUE / BY REF / ZEROS table"
            )
    out["table_mib"] = table
    return out


def outcome(status: str, mtime: float, now: float | None = None) -> str:
    if status == "running" and (now if now is not None else time.time()) - mtime > STALE_S:
        return "interrupted"
    return status


def read_entry(path: Path, node: str = "", now: float | None = None) -> dict[str, Any]:
    """One history entry from a .stats file; InvalidInput naming the file when it cannot be read."""
    m = _NAME.match(path.name)
    if m is None:
        raise InvalidInput(f"{path}: not a handoff stats file name (handoff_from_<ip>_at_<ts>.stats)")
    try:
        text = path.read_text()
        mtime = path.stat().st_mtime
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidInput(f"{path}: cannot read it ({exc})") from None
    e = parse_stats(text, str(path))
    started = dt.datetime.strptime(m["ts"], "%Y%m%dT%H%M%S").replace(tzinfo=dt.UTC)
    stem = path.name.removeprefix("handoff_").removesuffix(".stats")
    images = {k: path.with_name(f"{p}_{stem}.png") for k, p in (("memory", "mem"), ("disk", "disk"))}
    return {
        "when": started.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "from": e["source"] if e["source"] != "unknown" else m["ip"],
        "to": node,
        "instance": e["title"],
        "uuid": e["uuid"],
        "duration_s": e["elapsed_s"],
        "downtime_s": e["downtime_s"],
        "wire_bytes": round(e["wire_mib"] * MiB),  # the file holds MiB to 2 decimals (+-5 KiB)
        "outcome": outcome(e["status"], mtime, now),
        "iterations": e["iterations"],
        "blobs": e["blobs"],
        "memory_mib": e["memory_mib"],
        "disk_mib": e["disk_mib"],
        "wire_mib": e["wire_mib"],
        "wire_mib_by_channel": e["wire_mib_by_channel"],
        "table_mib": e["table_mib"],
        "stats_file": str(path),
        "log_file": str(path.with_suffix(".log")),
        "images": {k: str(p) for k, p in images.items() if p.exists()},
    }


def history(logs: Path, node: str = "", limit: int = 0) -> dict[str, Any]:
    """Every handoff recorded in ``logs``, oldest first (the last ``limit`` if > 0); a file that cannot
    be read is listed under "errors" with the reason, and the others are still returned."""
    entries, errors = [], []
    for p in sorted(logs.glob("handoff_from_*_at_*.stats")):
        try:
            entries.append(read_entry(p, node))
        except InvalidInput as exc:
            errors.append({"file": str(p), "error": str(exc)})
    entries.sort(key=lambda e: (e["when"], e["stats_file"]))
    if limit > 0:
        entries = entries[-limit:]
    return {"node": node, "handoffs": entries, "errors": errors}


def op(ctx: NodeContext, args: dict[str, Any]) -> dict[str, Any]:
    """Agent op ``handoff.history``: args ``limit`` (0: all) and ``node`` (the name to show as "to")."""
    try:
        limit = int(args.get("limit") or 0)
    except (TypeError, ValueError):
        raise InvalidInput(f"handoff.history: limit must be a number, not {args.get('limit')!r}") from None
    return history(ctx.store.logs, str(args.get("node") or ctx.hostname), limit)
