"""The watch daemon's event log: one JSON object per line, for people (`tail -f | jq`) and tools.

    {"ts": "2026-11-26T13:02:11.532Z", "event": "action", "revision": "main@sha1:3f2a9c1d7e4b",
     "action": "start_instance:instance/web-1", "node": "edge-a", "instance": "web-1",
     "result": "done", "duration": 7.41, "message": "uuid 0b5c..."}

Every line has the same keys (null when they do not apply): ts, event, revision, action, node,
instance, result, duration, message. `event` is one of: daemon (start, stop), revision (a new valid
revision, or an invalid one: result "invalid", message with every FILE:LINE:COL problem), git (a
fetch moved the checkout, or failed), pass (a pass that did something or failed: result applied,
failed, drift, suspended, superseded, plan_errors, in_sync after being out of sync), action (one per
action start and end), drift (one per action drift calls for), node (unreachable / reachable again),
resume (what a killed run left in flight). A pass with nothing to do writes nothing.

The file grows by appends (flushed per line) and is rotated to FILE.1 past 10 MiB.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from nephele.errors import NepheleError
from nephele.reconcile.actions import Action
from nephele.reconcile.journal import Journal, now_iso

FIELDS = ("revision", "action", "node", "instance", "result", "duration", "message")
ROTATE_BYTES = 10 * 2**20


class EventLog:
    def __init__(self, path: Path, rotate_bytes: int = ROTATE_BYTES) -> None:
        self.path = path
        self.rotate_bytes = rotate_bytes
        self.failed: str | None = None  # the last write error, until a write succeeds again
        self._lock = threading.Lock()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._file: Any = open(path, "a", encoding="utf-8")  # noqa: SIM115 - open for the daemon's life
        except OSError as exc:
            raise NepheleError(f"{path}: cannot open the event log: {exc.strerror or exc}") from exc

    def emit(self, event: str, **fields: Any) -> dict[str, Any]:
        rec: dict[str, Any] = {"ts": now_iso(), "event": event}
        for k in FIELDS:
            rec[k] = fields.pop(k, None)
        if isinstance(rec["duration"], float):
            rec["duration"] = round(rec["duration"], 3)
        rec.update(fields)  # extra keys (e.g. problems) after the fixed ones
        line = json.dumps(rec, ensure_ascii=False, default=str)
        with self._lock:
            if self._file is None:
                return rec
            try:
                self._file.write(line + "\n")
                self._file.flush()
                if self._file.tell() > self.rotate_bytes:
                    self._file.close()
                    self.path.replace(self.path.with_name(self.path.name + ".1"))
                    self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115
                self.failed = None
            except OSError as exc:  # a full disk must not stop the reconciling; the state file says it
                self.failed = f"{self.path}: cannot write the event log: {exc.strerror or exc}"
        return rec

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None


def read(path: Path) -> list[dict[str, Any]]:
    """Every complete line of an event log (a torn last line is ignored)."""
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except FileNotFoundError:
        return []
    out = []
    for line in lines:
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return out


class EventJournal(Journal):
    """The executor's journal, also copied into the event log as `action` events (start, retry and
    the end of each action, with its duration), as they happen: a long handoff shows up when it
    starts, not only when it ends."""

    def __init__(self, directory: Path, log: EventLog, revision: str, actions: Mapping[str, Action]) -> None:
        super().__init__(directory)
        self.log = log
        self.revision = revision
        self.actions = actions
        self._started: dict[str, float] = {}

    def event(self, event: str, **fields: Any) -> None:
        super().event(event, **fields)
        action = fields.get("action")
        if not action:
            return
        a = self.actions.get(str(action))
        address = a.address if a else str(action).split(":", 1)[-1].split("@", 1)[0]
        node = a.node if a else None
        instance = address.split("/", 1)[1] if address.startswith("instance/") else None
        duration = None
        if event == "start":
            self._started.setdefault(str(action), time.monotonic())
        elif event != "retry":
            t0 = self._started.pop(str(action), None)
            duration = time.monotonic() - t0 if t0 is not None else None
        message = fields.get("error") or fields.get("detail") or None
        if event == "start":
            message = f"attempt {fields.get('attempt', 1)}"
        self.log.emit(
            "action",
            revision=self.revision,
            action=action,
            node=node,
            instance=instance,
            result=event,
            duration=duration,
            message=message,
        )
