"""The apply journal: one JSON event per line, appended and fsynced as actions progress, so that a
killed apply leaves a record of what was in flight (kopf's "progress on disk", without a database).

    {"ts": ..., "run": RUN_ID, "event": "run_start", "manifest": ..., "revision": ...}
    {"ts": ..., "run": RUN_ID, "event": "start", "action": ID, "attempt": 1}
    {"ts": ..., "run": RUN_ID, "event": "retry", "action": ID, "attempt": 1, "delay": 2.0, "error": ...}
    {"ts": ..., "run": RUN_ID, "event": "done" | "noop" | "failed" | "skipped", "action": ID, ...}
    {"ts": ..., "run": RUN_ID, "event": "run_end", "ok": true}

The next apply does not replay it: it re-plans from a fresh observation (level-triggered), and uses the
journal only to say what the last run left unfinished, so the user sees why, e.g., a handoff is being
checked on both nodes. A new run rotates the file to journal.prev.jsonl.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nephele.errors import NepheleError
from nephele.reconcile import statedir

FILE = "journal.jsonl"
PREV = "journal.prev.jsonl"
ENDS = ("done", "noop", "failed", "skipped")


@dataclass(frozen=True)
class Interrupted:
    """An action that a previous run started and never finished (the run was killed)."""

    run: str
    action: str
    attempt: int
    since: str


def now_iso() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def read_events(path: Path) -> list[dict[str, Any]]:
    """Every complete event line; a torn last line (killed mid-write) is ignored."""
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise NepheleError(f"{path}: cannot read the journal: {exc.strerror or exc}") from exc
    events = []
    for line in lines:
        try:
            ev = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(ev, dict):
            events.append(ev)
    return events


def interrupted(events: list[dict[str, Any]]) -> list[Interrupted]:
    """Actions started in a run that has no run_end and that never reached an end event."""
    ended_runs = {e.get("run") for e in events if e.get("event") == "run_end"}
    open_: dict[tuple[str, str], Interrupted] = {}
    for e in events:
        run, action = str(e.get("run")), str(e.get("action", ""))
        if e.get("event") == "start" and run not in ended_runs:
            open_[(run, action)] = Interrupted(run, action, int(e.get("attempt", 1)), str(e.get("ts")))
        elif e.get("event") in ENDS:
            open_.pop((run, action), None)
    return list(open_.values())


class Journal:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.path = directory / FILE
        self.run = uuid.uuid4().hex[:12]
        self._lock = threading.Lock()
        self._file: Any = None

    def previous_interrupted(self) -> list[Interrupted]:
        """What the last run left in flight (read before `begin` rotates the file)."""
        return interrupted(read_events(self.path))

    def begin(self, **fields: Any) -> None:
        statedir.ensure(self.directory)
        if self.path.exists():
            os.replace(self.path, self.directory / PREV)
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - open for the whole run
        self.event("run_start", **fields)

    def event(self, event: str, **fields: Any) -> None:
        if self._file is None:
            return
        line = json.dumps({"ts": now_iso(), "run": self.run, "event": event, **fields}, ensure_ascii=False)
        with self._lock:
            self._file.write(line + "\n")
            self._file.flush()
            os.fsync(self._file.fileno())

    def end(self, ok: bool) -> None:
        self.event("run_end", ok=ok)
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None
