"""The watch daemon: keep the nodes equal to the manifest, whenever the file or its git branch moves
and whenever live state drifts (GITOPS §3.7). docs/watch.md explains the design; in short:

* Level-triggered. File events (debounced), a git fetch that fast-forwards the checkout, the jittered
  periodic resync and a dark node answering again only *wake* the loop. Every pass re-reads nothing
  from the trigger: it takes the newest valid revision, observes the nodes afresh, plans (pure),
  applies through the executor, and records the result.
* Two threads. The main thread owns the triggers, reads and validates each new revision, probes dark
  nodes and handles signals; one worker thread runs passes, one at a time. So a long handoff never
  keeps the daemon from noticing (and validating, and reporting) a newer revision.
* Supersede. Right before the executor starts an action (execute.apply's should_start hook) the
  daemon checks whether a newer valid revision arrived; if so it plans that revision against the
  pass's observation and keeps the action from starting unless the newer plan has the very same
  action (same kind, address, nodes, ports, state). Running actions are never interrupted: a handoff
  in its switchover finishes. The pass then ends and the next one starts at once on the new revision.
* An invalid revision is reported (every FILE:LINE:COL problem, once per revision) and the last
  valid one stays in force (kept in memory and, for restarts, as watch.last-good.yaml in the state
  directory). A node that does not answer is left out of passes (its objects are unknown, never
  pruned) and probed alone with capped, jittered exponential backoff, forever.
* Drift (the plan is not empty although the manifest did not change since it was last applied) is
  corrected, or only reported with self_heal=False (once per distinct drift, not every pass).
* Suspend: suspend.json in the state directory, per manifest or per instance (`nephele watch suspend`).
* Records: status.json (what `nephele status` shows as last applied / attempted, same format as
  apply's), watch.json (the daemon's own state), the event log (events.py), the journal (a restart
  reports what the killed run left in flight, then re-plans from what the nodes say).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import random
import signal
import socket
import threading
import time
import traceback
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import FrameType
from typing import Any

import yaml

from nephele.errors import LockHeld, ManifestError, NepheleError, Problem
from nephele.model import Desired, NodeObservation, Observed
from nephele.node.procs import pid_alive
from nephele.reconcile import execute, locks, statedir
from nephele.reconcile.actions import Action, Plan
from nephele.reconcile.controller import Controller, read_manifest, revision
from nephele.reconcile.events import EventJournal, EventLog
from nephele.reconcile.journal import Journal
from nephele.reconcile.observe import (
    DEFAULT_TIMEOUT,
    TransportFactory,
    TransportPool,
    UnreachableLog,
    default_factory,
    observe,
)
from nephele.reconcile.plan import plan
from nephele.reconcile.triggers import Backoff, Debouncer, FileWatcher, GitPoller, jittered

STATE_FILE = "watch.json"
SUSPEND_FILE = "suspend.json"
LAST_GOOD_FILE = "watch.last-good.yaml"
EVENTS_FILE = "events.jsonl"
STATE_FORMAT_VERSION = "1"
HANDOFF_POLL = 5.0  # s between passes while a handoff runs on the nodes (it may have been started by
# a killed run or another controller: the planner waits for it, the daemon looks again soon)

ApplyFn = Callable[..., execute.ApplyResult]
SayFn = Callable[[str], None]


def now_iso() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# ------------------------------------------------------------------------------------- revisions


@dataclass(frozen=True)
class Revision:
    """One valid version of the manifest."""

    path: str
    raw: bytes
    desired: Desired
    info: Mapping[str, Any]  # controller.revision(): text, sha256, git_commit, git_dirty

    @property
    def sha(self) -> str:
        return str(self.info["sha256"])

    @property
    def text(self) -> str:
        return str(self.info["text"])


def resolve_manifest(path: str) -> Path:
    """-f FILE, or -f DIR: DIR/cloudlet.yaml (.yml), else the only *.yaml / *.yml file in DIR."""
    p = Path(path)
    if not p.is_dir():
        return p
    for name in ("cloudlet.yaml", "cloudlet.yml"):
        if (p / name).is_file():
            return p / name
    found = sorted(q for q in p.iterdir() if q.suffix in (".yaml", ".yml") and q.is_file())
    if len(found) != 1:
        what = ", ".join(q.name for q in found) or "none"
        raise NepheleError(
            f"{p}: expected cloudlet.yaml or exactly one .yaml file in the directory, found {what}"
        )
    return found[0]


def lenient_name(raw: bytes) -> str | None:
    """metadata.name of a manifest that may be invalid (to find its state directory)."""
    try:
        data = yaml.safe_load(raw.decode("utf-8-sig", errors="replace"))
    except yaml.YAMLError:
        return None
    meta = data.get("metadata") if isinstance(data, dict) else None
    name = meta.get("name") if isinstance(meta, dict) else None
    return name if isinstance(name, str) and name and "/" not in name else None


# ------------------------------------------------------------------------------------ suspension


@dataclass(frozen=True)
class Suspension:
    manifest: bool = False
    instances: frozenset[str] = frozenset()

    def covers(self, a: Action) -> bool:
        return self.manifest or a.address in {f"instance/{n}" for n in self.instances}

    def to_dict(self) -> dict[str, Any]:
        return {"manifest": self.manifest, "instances": sorted(self.instances)}


def read_suspension(directory: Path) -> Suspension:
    data = statedir.read_json(directory / SUSPEND_FILE, "suspension file")
    if not isinstance(data, dict):
        return Suspension()
    return Suspension(bool(data.get("manifest")), frozenset(str(n) for n in data.get("instances") or ()))


def set_suspension(directory: Path, targets: Collection[str], suspend: bool) -> Suspension:
    """No targets: the whole manifest; else `instance/NAME` each. Returns the new suspension."""
    cur = read_suspension(directory)
    names = set(cur.instances)
    whole = cur.manifest
    for t in targets:
        kind, _, name = t.partition("/")
        if kind != "instance" or not name:
            raise NepheleError(
                f"{t!r}: suspend and resume take instance/NAME (or nothing: the whole manifest)"
            )
        (names.add if suspend else names.discard)(name)
    if not targets:
        whole = suspend
        if not suspend:
            names = set()  # `resume` without a target resumes everything
    new = Suspension(whole, frozenset(names))
    statedir.write_json(directory / SUSPEND_FILE, {**new.to_dict(), "updated": now_iso()})
    return new


def hold(p: Plan, suspension: Suspension) -> tuple[Plan, list[tuple[Action, str]]]:
    """The plan without the actions a suspension holds back, and without what depends on them."""
    held: dict[str, str] = {}
    for a in p.actions:  # dependencies come first in a plan
        if suspension.covers(a):
            held[a.id] = "suspended"
        else:
            dep = next((d for d in a.depends_on if d in held), None)
            if dep is not None:
                held[a.id] = f"held: it depends on {dep}, which is suspended"
    kept = tuple(a for a in p.actions if a.id not in held)
    return replace(p, actions=kept), [(p.action(i), why) for i, why in held.items()]


def intent(a: Action) -> tuple[Any, ...]:
    """What an action does, without the why (reasons, estimates and dependency ids may change
    between revisions while the action stays the same)."""
    return (a.id, a.kind, a.node, a.source_node, a.ports, a.state, a.mode, a.source)


def obsolete(a: Action, newer: Plan) -> bool:
    return intent(a) not in {intent(b) for b in newer.actions}


# ---------------------------------------------------------------------------------------- state


def read_state(directory: Path) -> dict[str, Any] | None:
    """The daemon state (watch.json), with `alive` added: whether its process still runs here."""
    data = statedir.read_json(directory / STATE_FILE, "watch daemon state")
    if not isinstance(data, dict):
        return None
    pid, host = data.get("pid"), data.get("host")
    alive = False
    if data.get("state") not in ("stopped",) and host == socket.gethostname() and isinstance(pid, int):
        alive = pid_alive(pid)
    data["alive"] = alive
    return data


def describe_state(doc: Mapping[str, Any]) -> list[str]:
    """A few lines for `nephele status`."""
    if doc.get("alive"):
        head = f"Watch daemon: running (pid {doc.get('pid')}, since {doc.get('started')}), {doc.get('state')}"
    else:
        head = f"Watch daemon: not running (last seen {doc.get('updated')})"
    lines = [head]
    last = doc.get("last_pass")
    if last:
        lines.append(
            f"  last pass: {last.get('at')} {last.get('result')} on {last.get('revision')}: "
            f"{last.get('message')}"
        )
    applied = doc.get("revision_applied")
    if applied:
        lines.append(f"  revision applied: {applied.get('revision')} at {applied.get('at')}")
    bad = doc.get("invalid_revision")
    if bad:
        lines.append(f"  invalid revision {bad.get('revision')} ignored, last good in force:")
        lines += [f"    {p}" for p in bad.get("problems") or []]
    sus = doc.get("suspended") or {}
    if sus.get("manifest"):
        lines.append("  suspended: the whole manifest")
    elif sus.get("instances"):
        lines.append("  suspended: " + ", ".join(f"instance/{n}" for n in sus["instances"]))
    err = doc.get("last_error")
    if err:
        lines.append(f"  last error: {err.get('at')}: {err.get('message')}")
    for n, v in (doc.get("unreachable") or {}).items():
        lines.append(
            f"  node {n} unreachable, {v.get('attempts')} probe(s), next in {v.get('next_probe_in')} s"
        )
    return lines


# ------------------------------------------------------------------------------------- options


@dataclass(frozen=True)
class WatchOptions:
    manifest: Path
    resync: float = 300.0
    git_poll: float | None = None
    self_heal: bool = True
    debounce: float = 0.5
    timeout: float = DEFAULT_TIMEOUT
    parallelism: int | None = None
    backoff_initial: float = 2.0
    backoff_cap: float = 60.0
    events: Path | None = None


@dataclass
class Outcome:
    """What one pass did. `result`: in_sync, applied, failed, drift, suspended, superseded, stopped,
    plan_errors, error."""

    result: str
    message: str
    revision: str
    actions: int = 0
    apply: execute.ApplyResult | None = None
    duration: float = 0.0
    requeue_after: float | None = None  # look again this soon (a handoff in flight on the nodes)

    @property
    def retry(self) -> bool:
        return self.result in ("failed", "plan_errors", "error")

    @property
    def exit_code(self) -> int:
        """--once: like apply (0 ok or nothing to do, 1 error), 2 for drift left alone."""
        if self.result in ("in_sync", "applied", "suspended"):
            return 0
        return 2 if self.result == "drift" else 1


@dataclass
class _Current:
    rev: Revision
    observed: Observed
    inventory: Any
    newer: dict[str, Plan] = field(default_factory=dict)  # newer revision sha -> its plan


# ---------------------------------------------------------------------------------------- watcher


class Watcher:
    def __init__(
        self,
        options: WatchOptions,
        *,
        factory: TransportFactory | None = None,
        apply_fn: ApplyFn = execute.apply,
        handoff_fn: execute.HandoffFn | None = None,
        say: SayFn = print,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self.opts = options
        self.path = str(options.manifest)
        self.factory = factory
        self.apply_fn = apply_fn
        self.handoff_fn = handoff_fn
        self.say = say
        self.clock = clock
        self.rng = rng or random.Random()
        self.latest: Revision | None = None  # the newest valid revision (in force)
        self.seen: tuple[str, str] | None = None  # (sha, revision text) last read, valid or not
        self.invalid: dict[str, Any] | None = None
        self.name: str = ""
        self.directory = Path()
        self.log: EventLog | None = None
        self.stopping = threading.Event()
        self.wake = threading.Event()
        self.debouncer = Debouncer(options.debounce, max(options.debounce * 10, 5.0))
        self.node_backoff = Backoff(options.backoff_initial, options.backoff_cap, rng=self.rng)
        self.pass_backoff = Backoff(options.backoff_initial, options.backoff_cap, rng=self.rng)
        self.dark: dict[str, str] = {}  # node -> why it is unreachable
        self.probing: set[str] = set()
        self.suspension = Suspension()
        self.current: _Current | None = None
        self.last_outcome: Outcome | None = None
        self.out_of_sync = False
        self.reported: set[tuple[str, ...]] = set()  # drift / suspension reports already made
        self.state: dict[str, Any] = {}
        self._state_lock = threading.Lock()
        self._mutex = threading.Lock()  # dark / probing, shared by threads
        self.pending: set[str] = set()  # why a pass is wanted (serve)

    # --------------------------------------------------------------------------------- plumbing

    def emit(self, event: str, **fields: Any) -> None:
        if self.log is not None:
            self.log.emit(event, **fields)

    def save_state(self, **changes: Any) -> None:
        with self._state_lock:
            self.state.update(changes)
            now = self.clock()
            unreachable = {}
            for n, err in sorted(self.dark.items()):
                nxt = self.node_backoff.next_at(n)
                unreachable[n] = {
                    "error": err,
                    "attempts": self.node_backoff.attempts(n),
                    "next_probe_in": round(max(0.0, nxt - now), 1) if nxt is not None else None,
                }
            if self.log is not None and self.log.failed:
                self.state["event_log_error"] = self.log.failed
            else:
                self.state.pop("event_log_error", None)
            self.state.update(
                format_version=STATE_FORMAT_VERSION,
                updated=now_iso(),
                invalid_revision=self.invalid,
                suspended=self.suspension.to_dict(),
                unreachable=unreachable,
            )
            try:
                statedir.write_json(self.directory / STATE_FILE, self.state)
            except NepheleError as exc:  # the daemon keeps working; the state file is a report
                self.say(f"warning: {exc}")

    def error(self, message: str) -> None:
        self.say(f"error: {message}")
        self.save_state(last_error={"at": now_iso(), "message": message})

    # -------------------------------------------------------------------------------- revisions

    def prepare(self) -> None:
        """Read the manifest once, find the state directory, open the event log, report what a
        killed run left in flight. An invalid manifest falls back to the last good copy kept in the
        state directory; with neither, the daemon has nothing in force (it waits for a valid one)."""
        try:
            raw = Path(self.path).read_bytes()
        except OSError as exc:
            raise ManifestError(
                [Problem(self.path, 1, 1, "", f"cannot read the file: {exc.strerror or exc}")]
            ) from exc
        problems: ManifestError | None = None
        try:
            raw, desired = read_manifest(self.path)
            self.name = desired.name
        except ManifestError as exc:
            problems = exc
            name = lenient_name(raw)
            if name is None:
                raise
            self.name = name
        self.directory = statedir.ensure(statedir.state_dir(self.path, self.name))
        prev = read_state(self.directory)
        if prev is not None and prev["alive"] and prev.get("pid") != os.getpid():
            raise LockHeld(
                f"a watch daemon already follows manifest {self.name}: pid {prev.get('pid')} on "
                f"{prev.get('host')}, since {prev.get('started')} ({self.directory / STATE_FILE}); "
                "stop it first (SIGTERM)"
            )
        self.log = EventLog(self.opts.events or self.directory / EVENTS_FILE)
        self.state = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": now_iso(),
            "manifest": self.name,
            "manifest_path": self.path,
            "options": {
                "resync": self.opts.resync,
                "git_poll": self.opts.git_poll,
                "self_heal": self.opts.self_heal,
            },
            "state": "starting",
            "revision_applied": (prev or {}).get("revision_applied"),
            "last_good": (prev or {}).get("last_good"),
        }
        self.suspension = read_suspension(self.directory)
        self.emit("daemon", result="start", message=f"watching {self.path} (pid {os.getpid()})")
        for it in Journal(self.directory).previous_interrupted():
            msg = (
                f"the last run was killed while running {it.action} (attempt {it.attempt}, "
                f"started {it.since}); re-planning from what the nodes report now"
            )
            self.say(msg[0].upper() + msg[1:])
            self.emit("resume", action=it.action, result="interrupted", message=msg)
        # At once, not at the first pass that acts: a pass with nothing to do (the handoff the dead
        # daemon started finished on the nodes) takes no lock, and the stale one would block an apply.
        self._break_stale_lock(self.directory)
        if problems is None:
            self.refresh()
            return
        good = self.directory / LAST_GOOD_FILE
        if good.is_file():
            text = good.read_bytes()
            kept: Desired | None
            try:
                kept = _parse(text, self.path)
            except ManifestError:
                kept = None
            if kept is not None and kept.name == self.name:
                info = dict((prev or {}).get("last_good") or {})
                info["sha256"] = hashlib.sha256(text).hexdigest()
                info.setdefault("text", f"sha256:{info['sha256'][:12]}")
                self.latest = Revision(self.path, text, kept, info)
        self._report_invalid(raw, problems)
        if self.latest is not None:
            self.say(f"(The last good revision {self.latest.text} comes from {good}.)")

    def _report_invalid(self, raw: bytes, exc: ManifestError | NepheleError) -> None:
        info = revision(self.path, raw)
        problems = [str(p) for p in getattr(exc, "problems", [])] or [str(exc)]
        self.seen = (info["sha256"], info["text"])
        keep = self.latest.text if self.latest else "nothing (no valid revision yet)"
        self.invalid = {
            "revision": info["text"],
            "sha256": info["sha256"],
            "problems": problems,
            "at": now_iso(),
        }
        self.say(f"Revision {info['text']} is invalid; keeping {keep} in force:\n  " + "\n  ".join(problems))
        self.emit(
            "revision",
            revision=info["text"],
            result="invalid",
            message=f"{len(problems)} problem(s); keeping {keep}",
            problems=problems,
        )
        self.save_state()

    def refresh(self, *, force: bool = False) -> bool:
        """Read the manifest; True when a new valid revision is now in force. An invalid one is
        reported once. `force`: recompute the revision (a git commit that did not touch the file
        still is a new revision to record)."""
        try:
            raw = Path(self.path).read_bytes()
        except OSError as exc:
            err = ManifestError(
                [Problem(self.path, 1, 1, "", f"cannot read the file: {exc.strerror or exc}")]
            )
            if self.seen != ("unreadable", str(exc)):
                self.seen = ("unreadable", str(exc))
                self._report_invalid(b"", err)
            return False
        sha = hashlib.sha256(raw).hexdigest()
        if not force and self.seen is not None and self.seen[0] == sha:
            return False
        info = revision(self.path, raw)
        if self.seen == (sha, info["text"]):
            return False
        try:
            desired = _parse(raw, self.path)
            if desired.name != self.name:
                raise NepheleError(
                    f"{self.path}: metadata.name changed from {self.name!r} to {desired.name!r}; a watch "
                    "daemon follows one manifest (restart it to follow the new name)"
                )
        except (ManifestError, NepheleError) as exc:
            self._report_invalid(raw, exc)
            return False
        self.seen = (sha, info["text"])
        self.invalid = None
        old = self.latest
        self.latest = Revision(self.path, raw, desired, info)
        last_good = {k: info.get(k) for k in ("text", "sha256", "git_commit")}
        try:
            statedir.ensure(self.directory)
            _write_bytes(self.directory / LAST_GOOD_FILE, raw)
        except NepheleError as exc:  # only a restart with a broken manifest needs it: warn, go on
            self.say(f"warning: {exc}")
        self.save_state(revision_latest={"revision": info["text"], "at": now_iso()}, last_good=last_good)
        if old is None or old.sha != sha or old.text != info["text"]:
            self.emit("revision", revision=info["text"], result="valid", message=f"sha256:{sha[:12]}")
        self.pass_backoff.success("pass")  # a new revision is tried at once, whatever failed before
        return True

    # ------------------------------------------------------------------------------------ a pass

    def observe(self, ctl: Controller, *, all_nodes: bool) -> Observed:
        """Observe the nodes not known to be dark; the dark ones are unreachable without a call
        (their probes run apart, so a dead node never slows a pass down)."""
        desired = ctl.desired
        with self._mutex:
            dark = {} if all_nodes else {n: e for n, e in self.dark.items() if n in desired.nodes}
        live = [n for n in desired.nodes if n not in dark]
        log = UnreachableLog(ctl.directory)
        seen = log.read()
        got = observe(desired, ctl.pool, ctl.timeout, nodes=live).nodes if live else {}
        stamp = now_iso()
        nodes: dict[str, NodeObservation] = {}
        for n in desired.nodes:
            if n in got:
                o = got[n]
                nodes[n] = o if o.reachable else replace(o, since=seen.get(n, o.since or stamp))
            else:
                nodes[n] = NodeObservation.unreachable(n, since=seen.get(n, stamp), error=dark[n])
        merged = Observed(nodes=nodes)
        log.update(merged)
        for n in live:
            o = nodes[n]
            if not o.reachable:
                self.mark_dark(n, o.error or "unreachable")
        return merged

    def mark_dark(self, node: str, error: str) -> None:
        with self._mutex:
            new = node not in self.dark
            self.dark[node] = error
            delay = self.node_backoff.failure(node, self.clock())
        if new:
            self.say(
                f"Node {node} is unreachable ({error}); probing it again in {delay:.0f} s, the others go on."
            )
            self.emit("node", node=node, result="unreachable", message=error)
        self.save_state()

    def run_pass(self, rev: Revision, *, all_nodes: bool = False) -> Outcome:
        t0 = self.clock()
        try:
            out = self._run_pass(rev, all_nodes=all_nodes)
        except NepheleError as exc:
            out = Outcome("error", str(exc), rev.text)
        out.duration = self.clock() - t0
        quiet = out.result in ("in_sync", "drift", "suspended") and not out.actions
        if not quiet or (out.result == "in_sync" and self.out_of_sync):
            self.emit(
                "pass", revision=rev.text, result=out.result, duration=out.duration, message=out.message
            )
        self.out_of_sync = out.result not in ("in_sync", "applied")
        if out.retry:
            self.say(f"Pass on {rev.text} {out.result}: {out.message}")
        last_pass = {
            "at": now_iso(),
            "revision": rev.text,
            "result": out.result,
            "message": out.message,
            "duration": round(out.duration, 3),
            "actions": out.actions,
        }
        if out.retry:
            self.save_state(last_pass=last_pass, last_error={"at": now_iso(), "message": out.message})
        else:
            self.save_state(last_pass=last_pass)
        return out

    def _run_pass(self, rev: Revision, *, all_nodes: bool) -> Outcome:
        ctl = Controller.from_parts(
            rev.path, rev.raw, rev.desired, factory=self.factory, timeout=self.opts.timeout
        )
        try:
            observed = self.observe(ctl, all_nodes=all_nodes)
            inventory = ctl.inventory.reconcile(observed)
            the_plan = plan(rev.desired, observed, inventory)
            record = ctl.read_status()
            if the_plan.errors:
                msg = "; ".join(e.message for e in the_plan.errors)
                self._record(ctl, rev, ok=False, complete=False, message=f"plan errors: {msg}")
                return Outcome("plan_errors", msg, rev.text)
            self.suspension = read_suspension(ctl.directory)
            runnable, held = hold(the_plan, self.suspension)
            inflight = any(
                i.handoff_url for o in observed.nodes.values() if o.reachable for i in o.instances.values()
            )
            # This manifest's instances a handoff (maybe a killed run's) is moving: the planner leaves
            # them alone until it ends, so the revision is not applied yet, and the daemon looks again soon.
            moving = sorted(
                {
                    i.name
                    for o in observed.nodes.values()
                    if o.reachable
                    for i in o.instances.values()
                    if i.handoff_url and i.name in rev.desired.instances
                }
            )
            if not runnable.actions:
                waiting = f"waiting for the handoff of {', '.join(moving)} in flight" if moving else ""
                self._record(
                    ctl,
                    rev,
                    ok=True,
                    complete=not held and not the_plan.unknown and not moving,
                    message=waiting or "no changes",
                )
                note = f"in sync; {len(held)} action(s) held by suspension" if held else "in sync"
                if held:
                    self._report_once("suspended", rev, held)
                    return Outcome("suspended", note, rev.text)
                if moving:
                    note = waiting
                if the_plan.unknown:
                    note += f"; {len(the_plan.unknown)} object(s) unknown (node unreachable)"
                if the_plan.warnings:
                    note += "; " + "; ".join(str(x) for x in the_plan.warnings)
                return Outcome("in_sync", note, rev.text, requeue_after=HANDOFF_POLL if inflight else None)
            applied = (record.get("last_applied") or {}).get("sha256")
            attempted = (record.get("last_attempted") or {}).get("sha256")
            # Drift: this very content was applied, and nothing else was tried since. A revert to an
            # earlier applied content after a newer revision was partly applied (stopped, failed) is a
            # change to apply, not drift to leave alone with --no-self-heal.
            drift = applied == rev.sha and attempted in (None, rev.sha)
            if drift and not self.opts.self_heal:
                self._report_once("drift", rev, [(a, a.reason) for a in runnable.actions])
                return Outcome(
                    "drift",
                    f"{len(runnable.actions)} action(s) of drift left alone (self-heal is off)",
                    rev.text,
                )
            if drift:
                for a in runnable.actions:
                    self.emit(
                        "drift",
                        revision=rev.text,
                        action=a.id,
                        node=a.node,
                        instance=_instance(a),
                        result="correcting",
                        message=a.reason,
                    )
                    self.say(f"Drift: {a.address} on {a.node}: {a.reason}; correcting.")
            out = self._apply(ctl, rev, runnable, observed, inventory, bool(held) or bool(moving))
            if inflight and out.requeue_after is None:
                out.requeue_after = HANDOFF_POLL
            return out
        finally:
            ctl.close()

    def _report_once(self, kind: str, rev: Revision, items: list[tuple[Action, str]]) -> None:
        key = (kind, rev.sha, *sorted(a.id for a, _ in items))
        if key in self.reported:
            return
        self.reported.add(key)
        for a, why in items:
            self.emit(
                kind,
                revision=rev.text,
                action=a.id,
                node=a.node,
                instance=_instance(a),
                result="reported",
                message=why,
            )
            self.say(f"{kind.capitalize()}: {a.id} on {a.node}: {why}")

    def _lock(self, ctl: Controller) -> locks.LockInfo:
        try:
            return locks.acquire(ctl.directory, ctl.desired.name, "watch")
        except LockHeld:
            if self._break_stale_lock(ctl.directory):
                return locks.acquire(ctl.directory, ctl.desired.name, "watch")
            raise

    def _break_stale_lock(self, directory: Path) -> bool:
        """Our own previous incarnation, killed mid-pass, left its lock: it is ours to break (only a
        `watch` lock whose process is gone on this host; an operator's apply lock is never broken)."""
        held = locks.read(directory)
        if held is None or held.operation != "watch" or not locks.is_stale(held):
            return False
        locks.force_unlock(directory, held.id)
        msg = f"broke the stale watch lock {held.describe()}"
        self.say(msg[0].upper() + msg[1:] + ".")
        self.emit("daemon", result="lock_broken", message=msg)
        return True

    def _apply(
        self, ctl: Controller, rev: Revision, runnable: Plan, observed: Observed, inventory: Any, held: bool
    ) -> Outcome:
        lock = self._lock(ctl)
        assert self.log is not None
        journal = EventJournal(ctl.directory, self.log, rev.text, {a.id: a for a in runnable.actions})
        result: execute.ApplyResult | None = None
        self.current = _Current(rev, observed, inventory)
        self.save_state(state="applying", running=[a.id for a in runnable.actions])
        try:
            journal.begin(
                manifest=rev.desired.name,
                revision=rev.text,
                actions=[a.id for a in runnable.actions],
                by="watch",
            )
            kw: dict[str, Any] = {}
            if self.handoff_fn is not None:
                kw["handoff_fn"] = self.handoff_fn
            result = self.apply_fn(
                runnable,
                rev.desired,
                ctl.pool,
                execute.ApplyOptions(
                    parallelism=self.opts.parallelism or rev.desired.policy.parallelism,
                    observe_timeout=ctl.timeout,
                ),
                journal=journal,
                inventory=ctl.inventory,
                say=self.say,
                should_start=self.veto,
                **kw,
            )
        finally:
            journal.end(bool(result and result.ok))
            self.current = None
            locks.release(ctl.directory, lock)
            self.save_state(state="stopping" if self.stopping.is_set() else "idle", running=[])
        complete = result.ok and not held and not runnable.unknown
        self._record(ctl, rev, ok=result.ok, complete=complete, message=result.summary_line(), result=result)
        n = len(runnable.actions)
        not_run = result.by_status(execute.Status.NOT_RUN)
        if result.ok:
            if complete:
                self.save_state(
                    revision_applied={
                        "revision": rev.text,
                        "git_commit": rev.info.get("git_commit"),
                        "at": now_iso(),
                    }
                )
            return Outcome("applied", result.summary_line(), rev.text, n, result)
        if not_run and not result.by_status(execute.Status.FAILED):
            if any((r.error or "").startswith("superseded") for r in not_run):
                return Outcome(
                    "superseded",
                    f"{len(not_run)} action(s) superseded by a newer revision",
                    rev.text,
                    n,
                    result,
                )
            if self.stopping.is_set():
                return Outcome(
                    "stopped", f"{len(not_run)} action(s) not started: stopping", rev.text, n, result
                )
            return Outcome(
                "suspended", f"{len(not_run)} action(s) not started: suspended", rev.text, n, result
            )
        return Outcome("failed", result.summary_line(), rev.text, n, result)

    def veto(self, a: Action) -> str | None:
        """execute.apply's should_start: keep an action from starting when the daemon stops, when it
        was suspended meanwhile, or when a newer revision makes it obsolete."""
        if self.stopping.is_set():
            return "not started: the daemon is stopping"
        if self.suspension.covers(a):
            return "not started: suspended"
        cur, latest = self.current, self.latest
        if cur is None or latest is None or latest.sha == cur.rev.sha:
            return None
        newer = cur.newer.get(latest.sha)
        if newer is None:
            newer = cur.newer[latest.sha] = plan(latest.desired, cur.observed, cur.inventory)
        if obsolete(a, newer):
            return f"superseded by revision {latest.text}"
        return None

    def _record(
        self,
        ctl: Controller,
        rev: Revision,
        *,
        ok: bool,
        complete: bool,
        message: str,
        result: execute.ApplyResult | None = None,
    ) -> None:
        """status.json in apply's format: last attempted, last applied (only when complete), errors."""
        rec = ctl.read_status()
        errors: dict[str, str] = dict(rec.get("errors") or {})
        if result is not None:
            for r in result.results:
                if r.status is execute.Status.FAILED and r.error:
                    errors[r.action.address] = r.error
                elif r.status in execute.OK:
                    errors.pop(r.action.address, None)
        stamp = {
            "revision": rev.text,
            "sha256": rev.sha,
            "git_commit": rev.info.get("git_commit"),
            "at": now_iso(),
        }
        if result is None and ok:
            # A pass with nothing to do writes only when it has something new to say (no disk write
            # per resync): a new revision, a first success, or the first complete one.
            last = rec.get("last_attempted") or {}
            done = rec.get("last_applied") or {}
            same = last.get("revision") == rev.text and last.get("ok")
            if same and (not complete or (done.get("revision") == rev.text and not errors)):
                return
        rec["last_attempted"] = {**stamp, "ok": ok, "message": message, "by": "watch"}
        if complete:
            rec["last_applied"] = {**stamp, "by": "watch"}
            errors = {}
        rec["errors"] = errors
        ctl.write_status(rec)

    # -------------------------------------------------------------------------------- --once

    def once(self) -> int:
        """One pass (cron-style). Exit code: 0 in sync or applied, 1 error (an invalid manifest
        included, even when the last good one was applied), 2 drift left alone (self-heal off)."""
        self.prepare()
        self._install_signals()
        try:
            if self.latest is None:
                return 1
            out = self.run_pass(self.latest, all_nodes=True)
            self.say(f"Watch pass on {out.revision}: {out.result}: {out.message}")
            code = out.exit_code
            return 1 if self.invalid and code == 0 else code
        finally:
            self.save_state(state="stopped")
            self.emit("daemon", result="stop", message="--once")
            if self.log:
                self.log.close()

    # ------------------------------------------------------------------------------- the daemon

    def _install_signals(self) -> None:
        def handler(signum: int, frame: FrameType | None) -> None:
            if self.stopping.is_set():
                # The second signal: leave now, without waiting for the running action (the
                # executor's threads would be joined at exit). The journal keeps what was running;
                # the next start reports it, breaks this run's lock and re-plans.
                self.say("Second signal: exiting at once.")
                os._exit(130)
            self.stopping.set()
            self.wake.set()
            self.say(
                f"Received {signal.Signals(signum).name}: finishing the running action(s), "
                "starting no new one, then exiting (send it again to exit at once)."
            )

        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, handler)
            signal.signal(signal.SIGINT, handler)

    def on_file_event(self) -> None:
        self.debouncer.touch(self.clock())
        self.wake.set()

    def _probe(self, rev: Revision, node: str) -> None:
        pool = TransportPool(rev.desired, self.factory or default_factory(min(10.0, self.opts.timeout)))
        try:
            o = observe(rev.desired, pool, self.opts.timeout, nodes=[node]).nodes[node]
        except Exception as exc:  # a probe must never kill the daemon
            o = NodeObservation.unreachable(node, None, f"probe failed: {exc}")
        finally:
            pool.close()
        with self._mutex:
            self.probing.discard(node)
            if o.reachable:
                self.dark.pop(node, None)
                self.node_backoff.success(node)
            else:
                self.dark[node] = o.error or "unreachable"
                self.node_backoff.failure(node, self.clock())
        if o.reachable:
            self.say(f"Node {node} answers again.")
            self.emit("node", node=node, result="reachable", message="answers again")
            self.pending.add(f"node/{node} answers again")
        self.save_state()
        self.wake.set()

    def _pass_thread(self, rev: Revision) -> None:
        try:
            self.last_outcome = self.run_pass(rev)
        except Exception as exc:  # a bug must not kill the daemon: report, back off, go on
            traceback.print_exc()
            self.last_outcome = Outcome("error", f"internal error: {type(exc).__name__}: {exc}", rev.text)
        self.wake.set()

    def serve(self) -> int:
        """Run until SIGTERM/SIGINT. Returns 0 after a graceful stop."""
        self.prepare()
        self._install_signals()
        self.pending.add("start")
        git = GitPoller(Path(self.path).resolve().parent) if self.opts.git_poll else None
        watcher = FileWatcher([Path(self.path), self.directory / SUSPEND_FILE], self.on_file_event)
        watcher.start()
        now = self.clock()
        next_resync = now + jittered(self.opts.resync, self.rng)
        next_git = now if git else float("inf")
        git_error: str | None = None
        next_soon = float("inf")
        worker: threading.Thread | None = None
        self.save_state(state="idle")
        mode = (
            f"git {git.top} every {self.opts.git_poll:g} s" if git and self.opts.git_poll else "file events"
        )
        self.say(
            f"Watching {self.path} ({mode}, resync every {self.opts.resync:g} s, "
            f"self-heal {'on' if self.opts.self_heal else 'off'})."
        )
        try:
            while True:
                now = self.clock()
                if worker is not None and not worker.is_alive():
                    worker.join()
                    worker = None
                    out = self.last_outcome
                    if out is not None and out.retry and not self.stopping.is_set():
                        delay = self.pass_backoff.failure("pass", now)
                        self.say(f"Retrying in {delay:.0f} s.")
                        self.pending.add("retry")
                    elif out is not None:
                        self.pass_backoff.success("pass")
                    if out is not None and out.result == "superseded":
                        self.pending.add("superseded")
                    if out is not None and out.requeue_after is not None:
                        next_soon = now + out.requeue_after
                if self.stopping.is_set() and worker is None:
                    break
                if self.debouncer.take(now):
                    try:
                        sus = read_suspension(self.directory)
                    except NepheleError as exc:  # a hand-edited, broken suspend.json: keep the old one
                        self.error(str(exc))
                        sus = self.suspension
                    if sus != self.suspension:
                        self.suspension = sus
                        self.say(f"Suspension now: {_describe_suspension(sus)}.")
                        self.emit("daemon", result="suspension", message=_describe_suspension(sus))
                        self.save_state()
                        self.pending.add("suspension changed")
                    if self.refresh():
                        self.pending.add("manifest changed")
                if git is not None and now >= next_git:
                    assert self.opts.git_poll is not None
                    next_git = now + jittered(self.opts.git_poll, self.rng)
                    try:
                        polled = git.poll()
                        git_error = None
                        if polled.moved:
                            self.say(
                                f"git: {git.top} fast-forwarded {polled.before[:12]} -> "
                                f"{polled.after[:12]} ({polled.upstream})."
                            )
                            self.emit(
                                "git",
                                result="fast_forward",
                                message=f"{polled.before[:12]} -> {polled.after[:12]} ({polled.upstream})",
                                revision=polled.after,
                            )
                        if self.refresh(force=polled.moved):
                            self.pending.add(f"git {polled.after[:12]}")
                    except NepheleError as exc:
                        if str(exc) != git_error:
                            git_error = str(exc)
                            self.error(f"git poll: {exc}")
                            self.emit("git", result="failed", message=str(exc))
                if now >= next_soon:
                    next_soon = float("inf")
                    self.pending.add("a handoff is in flight")
                if now >= next_resync:
                    next_resync = now + jittered(self.opts.resync, self.rng)
                    self.pending.add("resync")
                if self.latest is not None:
                    with self._mutex:
                        due = [
                            n for n in self.dark if n not in self.probing and self.node_backoff.due(n, now)
                        ]
                        self.probing.update(due)
                    for n in due:
                        threading.Thread(target=self._probe, args=(self.latest, n), daemon=True).start()
                if (
                    self.pending
                    and worker is None
                    and not self.stopping.is_set()
                    and self.latest is not None
                    and self.pass_backoff.due("pass", now)
                ):
                    self.pending.clear()
                    worker = threading.Thread(
                        target=self._pass_thread, args=(self.latest,), daemon=True, name="watch-pass"
                    )
                    worker.start()
                deadlines = [next_resync, next_git, next_soon, self.debouncer.deadline() or float("inf")]
                if self.pending:
                    deadlines.append(self.pass_backoff.next_at("pass") or now)
                with self._mutex:
                    deadlines += [
                        self.node_backoff.next_at(n) or now for n in self.dark if n not in self.probing
                    ]
                timeout = min(max(min(deadlines) - self.clock(), 0.02), 1.0)
                self.wake.wait(timeout)
                self.wake.clear()
        finally:
            watcher.stop()
            self.save_state(state="stopped", running=[])
            self.emit("daemon", result="stop", message="stopped")
            if self.log:
                self.log.close()
        self.say("Stopped.")
        return 0


# ------------------------------------------------------------------------------------------ util


def _parse(raw: bytes, path: str) -> Desired:
    from nephele import manifest

    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ManifestError([Problem(path, 1, 1, "", "the file is not UTF-8 text")]) from exc
    return manifest.loads(text, path)


def _write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise NepheleError(f"{path}: cannot write: {exc.strerror or exc}") from exc


def _instance(a: Action) -> str | None:
    return a.name if a.address.startswith("instance/") else None


def _describe_suspension(s: Suspension) -> str:
    if s.manifest:
        return "the whole manifest is suspended"
    if s.instances:
        return "suspended: " + ", ".join(f"instance/{n}" for n in sorted(s.instances))
    return "nothing suspended"
