"""Executing a plan: walk the action graph on the nodes (Terraform's parallel DAG walk, with limits).

    apply(plan, desired, transports, options) -> ApplyResult

* Order: an action starts only when every action it depends on succeeded; when one fails for good,
  everything that depends on it (transitively) is skipped and reported, independent actions go on.
* Limits: at most `parallelism` actions at once, at most `per_node` touching one node, at most
  `plan.max_parallel_handoffs` handoffs cloudlet-wide and `policy.maxHandoffsPerNode` per node (as
  source or target); a handoff of wave N starts after every handoff of earlier waves ended.
* Retries: a temporary error (NodeUnreachable, RemoteError with temporary=True) is retried with capped
  exponential backoff (1 s, 2 s, 4 s ... at most 30 s, `retries` times); any other error stops the
  action at once (kopf's TemporaryError / PermanentError).
* Idempotence: right before it runs, each action observes its nodes again. If its effect is already
  there (the instance already runs, the image is already imported) it is a no-op; if one of its
  preconditions no longer holds, it fails without touching anything. So a killed apply, run again,
  neither duplicates nor loses a VM.
* Record: each success is written to the inventory (crash-safe) and every step to the journal.

The node ops used (docs/apply.md has the table) go through `Agent.call`; a handoff goes through
`handoff_fn`, by default `live_handoff` (nephele.handoff.perform).
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import dataclasses
import enum
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nephele.agent import Agent, AgentTransport
from nephele.errors import NepheleError, NodeUnreachable, PlanError, RemoteError
from nephele.model import Desired, InstanceState, NodeObservation, NodeSpec, Observed, bandwidth_cap
from nephele.reconcile import transfer
from nephele.reconcile.actions import BUCKET, BUCKETS, Action, ActionKind, Plan
from nephele.reconcile.inventory import InventoryStore
from nephele.reconcile.journal import Journal
from nephele.reconcile.observe import parse_node
from nephele.reconcile.planfile import stale_preconditions
from nephele.reconcile.render import headline

RESULT_FORMAT_VERSION = "1"
NOOP = "noop"  # what _Runner.run returns when the action's effect was already there
Transports = Callable[[str], AgentTransport]
EventFn = Callable[[str], None]
# Asked right before an action starts: None lets it start, a reason keeps it (and what depends on it)
# from starting; it is reported NOT_RUN with that reason (the watch daemon: superseded, stopping).
ShouldStart = Callable[[Action], str | None]


class Status(enum.StrEnum):
    DONE = "done"
    NOOP = "noop"  # its effect was already there
    FAILED = "failed"
    SKIPPED = "skipped"  # a dependency failed
    NOT_RUN = "not_run"  # interrupted before it started


OK = (Status.DONE, Status.NOOP)
PAST = {
    "start": "started",
    "change": "changed",
    "handoff": "handed off",
    "stop": "stopped",
    "prune": "pruned",
    "import": "imported",
}


@dataclass(frozen=True)
class ApplyOptions:
    parallelism: int = 4
    per_node: int = 2  # actions touching one node at once
    retries: int = 4  # extra attempts after a temporary error
    backoff_initial: float = 1.0
    backoff_max: float = 30.0
    call_timeout: float | None = 1800.0  # per changing call (not handoffs); None: no limit
    observe_timeout: float = 30.0
    # Image/snapshot copies resume after a cut link (reconcile/transfer.py); False: a retried copy
    # starts over (the baseline resuming is measured against).
    resume_copies: bool = True
    copies_dir: Path | None = None  # their partials; default: <state dir>/copies beside the inventory


@dataclass
class ActionResult:
    action: Action
    status: Status = Status.NOT_RUN
    attempts: int = 0
    seconds: float = 0.0
    error: str | None = None
    detail: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.action.id,
            "kind": self.action.kind.value,
            "address": self.action.address,
            "node": self.action.node,
            "source_node": self.action.source_node,
            "status": self.status.value,
            "attempts": self.attempts,
            "seconds": round(self.seconds, 3),
            "error": self.error,
            "detail": self.detail,
        }


@dataclass
class ApplyResult:
    plan: Plan
    results: list[ActionResult] = field(default_factory=list)
    interrupted: bool = False

    @property
    def ok(self) -> bool:
        return not self.interrupted and all(r.status in OK for r in self.results)

    def by_status(self, status: Status) -> list[ActionResult]:
        return [r for r in self.results if r.status is status]

    def done_counts(self) -> dict[str, int]:
        out = dict.fromkeys(BUCKETS, 0)
        for r in self.results:
            if r.status is Status.DONE:
                out[BUCKET[r.action.kind]] += 1
        return out

    def summary_line(self) -> str:
        c = self.done_counts()
        done = ", ".join(f"{c[b]} {PAST[b]}" for b in ("start", "change", "handoff", "stop", "prune"))
        if c["import"]:
            done += f", {c['import']} {PAST['import']}"
        noop = len(self.by_status(Status.NOOP))
        if noop:
            done += f", {noop} already done"
        if self.ok:
            return f"Apply complete: {done}."
        failed = self.by_status(Status.FAILED)
        parts = []
        if failed:
            parts.append(f"{len(failed)} failed ({', '.join(r.action.id for r in failed)})")
        skipped = len(self.by_status(Status.SKIPPED))
        if skipped:
            parts.append(f"{skipped} skipped")
        not_run = len(self.by_status(Status.NOT_RUN))
        if not_run:
            parts.append(f"{not_run} not run (interrupted)")
        return f"Apply failed: {'; '.join(parts)}; done: {done}."

    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": RESULT_FORMAT_VERSION,
            "manifest": self.plan.manifest,
            "ok": self.ok,
            "interrupted": self.interrupted,
            "summary": {
                **self.done_counts(),
                **{s.value: len(self.by_status(s)) for s in Status},
            },
            "message": self.summary_line(),
            "actions": [r.to_dict() for r in self.results],
        }


class ActionFailed(NepheleError):
    """An action cannot be done as planned (not retried)."""


@dataclass(frozen=True)
class HandoffRequest:
    """What a handoff needs; `handoff_fn` performs it and returns a short description of the outcome."""

    instance: str
    uuid: str
    source: AgentTransport
    dest: AgentTransport
    source_spec: NodeSpec
    dest_spec: NodeSpec
    mode: str  # "live" or "cold"
    downtime_ms: int
    progress: Callable[[str], None]
    bandwidth_mbit: float | None = None  # the manifest's cap for this pair of nodes (model.bandwidth_cap)
    timeout_s: float | None = None  # policy.handoffTimeout: give up (the VM stays on the source) after this
    auto_converge: bool = True  # policy.autoConverge: QEMU may slow a guest that outpaces the link


HandoffFn = Callable[[HandoffRequest], str]
PROGRESS_EVERY_S = 5.0  # a handoff progress line at most this often (and at the final stop-and-copy)


def live_handoff(req: HandoffRequest, *, clock: Callable[[], float] = time.monotonic) -> str:
    """The default handoff: nephele.handoff.perform, the live handoff of a running instance."""
    from nephele.handoff import perform  # loads the handoff machinery only when a plan moves a VM

    if req.mode != "live":
        raise ActionFailed(
            f"instance {req.instance} is stopped: a cold handoff (moving a stopped instance) is not "
            "supported yet; start it first, or remove it and start it on the new node"
        )
    last = [float("-inf")]

    def on_progress(ev: dict[str, Any]) -> None:
        kind = ev.get("event")
        if kind == "initiated":
            req.progress(f"initiated to {ev.get('url')}")
        elif kind == "progress" and ev.get("side") == "source":
            now = clock()
            if now - last[0] >= PROGRESS_EVERY_S or ev.get("paused"):
                last[0] = now
                req.progress(handoff_progress(ev))
        elif kind == "failed":
            req.progress(f"failed: {ev.get('error')}")

    res = perform(
        Agent(req.source),
        Agent(req.dest),
        req.uuid or req.instance,
        req.dest_spec,
        on_progress,
        downtime_ms=req.downtime_ms,
        source_address=req.source_spec.address,
        bandwidth_mbit=req.bandwidth_mbit,
        timeout_s=req.timeout_s,
        auto_converge=req.auto_converge,
    )
    down = f"downtime {res.downtime_s:.2f} s, " if res.downtime_s is not None else ""
    stats = res.destination.get("stats_file")
    return f"{down}{res.elapsed_s:.1f} s" + (f", stats {stats}" if stats else "")


def handoff_progress(ev: Mapping[str, Any]) -> str:
    """`iteration 3  12.0 MiB over the wire  18.4 Mbit/s  ETA 9 s` (or `stop-and-copy ...`)."""
    mib = 2**20
    phase = "stop-and-copy" if ev.get("paused") else f"iteration {ev.get('iteration', 0)}"
    eta = ev.get("eta_s")
    eta_text = "-" if eta is None else f"{float(eta):.0f} s"
    return (
        f"{phase}  {float(ev.get('wire_bytes', 0)) / mib:.1f} MiB over the wire  "
        f"{float(ev.get('rate_bps', 0)) * 8 / 1e6:.1f} Mbit/s  ETA {eta_text}"
        + (f"  guest slowed {ev['throttle_pct']} %" if ev.get("throttle_pct") else "")
    )


# ------------------------------------------------------------------------------------------ runner


class _Runner:
    """Performs single actions through the agents (one instance per apply; thread-safe)."""

    def __init__(
        self,
        desired: Desired,
        transports: Transports,
        options: ApplyOptions,
        handoff_fn: HandoffFn,
        base_dir: Path,
        say: EventFn,
    ) -> None:
        self.d = desired
        self.transports = transports
        self.opts = options
        self.handoff_fn = handoff_fn
        self.base_dir = base_dir
        self.say = say
        # Resumable copies keep their partials here (the state dir's copies/; a temporary directory
        # for this apply when there is none).
        self.copies_dir = options.copies_dir
        self._own_copies_dir = False
        self._copies_lock = threading.Lock()

    def call(self, node: str, op: str, args: Mapping[str, Any], progress: EventFn | None = None) -> Any:
        """A call that changes the node. A timeout is not retried: the op may still be running there,
        and a second `instance.run` would start a second VM. The next apply re-observes and goes on."""
        try:
            return Agent(self.transports(node)).call(
                op, args, timeout=self.opts.call_timeout, progress=progress
            )
        except NodeUnreachable as exc:
            if "did not answer within" in str(exc):
                raise ActionFailed(
                    f"{exc}; {op} may still be running on {node}, so it is not retried "
                    "(run nephele apply again to re-check and go on)"
                ) from exc
            raise

    def observe_nodes(self, a: Action) -> Observed:
        nodes = {a.node, *([a.source_node] if a.source_node else []), *(p.node for p in a.preconditions)}
        out: dict[str, NodeObservation] = {}
        for n in sorted(nodes):
            raw = Agent(self.transports(n)).call("observe", {}, timeout=self.opts.observe_timeout)
            try:
                out[n] = parse_node(n, raw)
            except ValueError as exc:
                raise ActionFailed(f"node {n}: {exc}") from exc
        return Observed(nodes=out)

    # ------------------------------------------------------------------------ effect already there

    def already_done(self, a: Action, o: Observed) -> bool:
        node = o.nodes[a.node]
        inst = node.instances.get(a.name)
        match a.kind:
            case ActionKind.IMPORT_IMAGE:
                return a.name in node.images
            case ActionKind.DISTRIBUTE_SNAPSHOT:
                return a.name in node.snapshots
            case ActionKind.REMOVE_IMAGE:
                return a.name not in node.images
            case ActionKind.REMOVE_SNAPSHOT:
                return a.name not in node.snapshots
            case ActionKind.START_INSTANCE:
                return inst is not None and inst.state is (a.state or InstanceState.RUNNING)
            case ActionKind.STOP_INSTANCE:
                return inst is not None and inst.state is InstanceState.STOPPED
            case ActionKind.PAUSE_INSTANCE:
                return inst is not None and inst.state is InstanceState.PAUSED
            case ActionKind.RESUME_INSTANCE:
                return inst is not None and inst.state is InstanceState.RUNNING
            case ActionKind.CHANGE_PORTS:
                return inst is not None and set(inst.ports) == set(a.ports)
            case ActionKind.HANDOFF:
                src = o.nodes[a.source_node].instances.get(a.name) if a.source_node else None
                return inst is not None and src is None and not inst.handoff_url
            case ActionKind.PRUNE:
                uuid_ = next((p.uuid for p in a.preconditions if p.uuid), "")
                return inst is None or bool(uuid_ and inst.uuid != uuid_)
        return False

    # ---------------------------------------------------------------------------------------- run

    def run(self, a: Action, progress: EventFn) -> str:
        """Run one attempt of `a`. Returns "noop" when its effect was already there, else a detail."""
        o = self.observe_nodes(a)
        if self.already_done(a, o):
            return NOOP
        stale = stale_preconditions(Plan(manifest=self.d.name, actions=(a,)), o)
        if stale:
            raise ActionFailed(
                "the nodes changed since the plan was made: "
                + "; ".join(s.split(": ", 1)[1] for s in stale)
                + " (run nephele apply again to re-plan)"
            )
        inst = o.nodes[a.node].instances.get(a.name)
        ref = inst.uuid if inst else a.name
        match a.kind:
            case ActionKind.IMPORT_IMAGE:
                return self.copy_in("image", a, o, progress)
            case ActionKind.DISTRIBUTE_SNAPSHOT:
                return self.copy_in("snapshot", a, o, progress)
            case ActionKind.REMOVE_IMAGE:
                cid = o.nodes[a.node].images[a.name].content_id
                self.call(a.node, "image.rm", {"id": cid or a.name})
                return "removed"
            case ActionKind.REMOVE_SNAPSHOT:
                cid = o.nodes[a.node].snapshots[a.name].content_id
                self.call(a.node, "snapshot.rm", {"name": cid or a.name})
                return "removed"
            case ActionKind.START_INSTANCE:
                return self.start(a, inst.uuid if inst else None, progress)
            case ActionKind.STOP_INSTANCE:
                self.call(a.node, "instance.stop", {"instance": ref})
                return "stopped"
            case ActionKind.PAUSE_INSTANCE:
                self.call(a.node, "instance.pause", {"instance": ref})
                return "paused"
            case ActionKind.RESUME_INSTANCE:
                self.call(a.node, "instance.resume", {"instance": ref})
                return "resumed"
            case ActionKind.CHANGE_PORTS:
                self.call(a.node, "instance.set_ports", {"instance": ref, "ports": [str(p) for p in a.ports]})
                return "ports " + (", ".join(str(p) for p in a.ports) or "none")
            case ActionKind.PRUNE:
                self.call(a.node, "instance.rm", {"instance": ref})
                return "removed"
            case ActionKind.HANDOFF:
                return self.handoff(a, o, progress)
        raise ActionFailed(f"unknown action kind {a.kind}")  # pragma: no cover

    def start(self, a: Action, stopped_uuid: str | None, progress: EventFn) -> str:
        want = a.state or InstanceState.RUNNING
        if stopped_uuid:
            rec = self.call(a.node, "instance.start", {"instance": stopped_uuid}, progress)
        else:
            spec = self.d.instances.get(a.name)
            if spec is None:
                raise ActionFailed(f"instance {a.name} is not in the manifest")
            rec = self.call(
                a.node,
                "instance.run",
                {
                    "title": a.name,
                    "snapshot": spec.snapshot,
                    "ports": [str(p) for p in a.ports],
                    "manifest": self.d.name,
                    "prune": spec.prune,
                },
                progress,
            )
        uuid_ = rec.get("uuid") if isinstance(rec, dict) else None
        if want is InstanceState.PAUSED:
            self.call(a.node, "instance.pause", {"instance": uuid_ or a.name})
        return f"uuid {uuid_}" if uuid_ else "started"

    def copy_in(self, kind: str, a: Action, o: Observed, progress: EventFn) -> str:
        """Bring an image or snapshot to a.node: from a.source_node (below), or uploaded from the
        manifest's source file, then imported (the node checks the content id). An image is then
        warmed for handoffs (its reference images and indexes, libvirt's capabilities), which a
        handoff into that node would otherwise do first."""
        note = self._copy_in(kind, a, o, progress)
        if kind == "image":
            with contextlib.suppress(NepheleError):  # best effort: a handoff does it itself if needed
                self.call(a.node, "handoff.warm", {"image": a.name}, progress)
        return note

    def _copy_in(self, kind: str, a: Action, o: Observed, progress: EventFn) -> str:
        if a.source_node:
            return self.copy_from_node(kind, a, o, progress)
        if not a.source:
            raise ActionFailed(f"{a.address} has no source file and no node to copy it from")
        local = Path(a.source)
        if not local.is_absolute():
            local = self.base_dir / local
        if not local.is_file():
            raise ActionFailed(f"{a.address}: source file {local} does not exist")
        t = self.transports(a.node)
        if not transfer.can_resume(t):
            remote = self.tmp_path(a.node, kind, a.name)
            progress(f"uploading {local.name} ({mib(local.stat().st_size)})")
            t.put_file(local, remote)
            # The import removes its upload from tmp/ (node/images.discard_upload).
            self.call(a.node, f"{kind}.import", {"path": remote, "name": a.name}, progress)
            return f"from {a.source}"
        # Named by its content: a retry after a cut link finds the partial and sends only the rest.
        digest = transfer.sha256_of(local)
        remote = f"{self.d.nodes[a.node].root}/tmp/{transfer.part_name(kind, a.name, digest)}"
        try:
            moved = self.upload_and_import(kind, a, local, remote, f"{kind}.import", progress)
        except _NoSuchOp as exc:
            raise exc.error from None
        return f"from {a.source}" + resumed_note(moved)

    def tmp_path(self, node: str, kind: str, name: str) -> str:
        return f"{self.d.nodes[node].root}/tmp/nephele-{kind}-{name}-{uuid.uuid4().hex[:8]}.zip"

    def discard(self, node: str, path: str) -> None:
        """Remove an export from the source node's tmp/ once fetched (best effort: a node without the
        op keeps it). The target needs no such call: an import removes its own upload."""
        with contextlib.suppress(NepheleError):
            Agent(self.transports(node)).call(
                "copy.discard", {"path": path}, timeout=self.opts.observe_timeout
            )

    def ask_partial(self, node: str) -> transfer.Ask:
        """copy.partial on `node`; the function returns None when the node has no such op."""

        def ask(args: dict[str, Any]) -> dict[str, Any] | None:
            try:
                # Quick (a hash of what the node holds) and idempotent: a short timeout, retried.
                res = Agent(self.transports(node)).call(
                    "copy.partial", args, timeout=max(60.0, 4 * self.opts.observe_timeout)
                )
            except RemoteError as exc:
                if exc.kind == "unsupported":
                    return None
                raise
            return res if isinstance(res, dict) else None

        return ask

    def copy_cap(self, a: Action) -> float | None:
        """The manifest's rate cap for a copy into a.node (from a.source_node when there is one): both
        hops through the controller are held to it."""
        ends = [self.d.nodes[n] for n in (a.source_node, a.node) if n and n in self.d.nodes]
        return bandwidth_cap(self.d.policy, *ends)

    def upload_and_import(
        self, kind: str, a: Action, local: Path, remote: str, imp: str, progress: EventFn
    ) -> transfer.Moved:
        """Upload (resuming a partial) and import. An import that refuses a resumed upload (it removes
        the upload either way) gets the file whole once more: the import's check is the last word."""
        t = self.transports(a.node)
        resume = self.opts.resume_copies
        cap = self.copy_cap(a)
        moved = transfer.upload(
            t, self.ask_partial(a.node), local, remote, progress, resume=resume, rate_mbit=cap
        )
        try:
            self.call_op(a.node, imp, {"path": remote, "name": a.name}, progress)
        except RemoteError as exc:
            if not moved.resumed_at or exc.kind != "invalid_input":
                raise
            progress(f"the resumed upload did not verify ({exc}): sending it whole")
            self.discard(a.node, remote)  # the import removed it already; a node that did not, now
            again = transfer.upload(
                t, self.ask_partial(a.node), local, remote, progress, resume=False, rate_mbit=cap
            )
            self.call_op(a.node, imp, {"path": remote, "name": a.name}, progress)
            return transfer.Moved(moved.size, 0, moved.sent + again.sent)
        return moved

    def copy_from_node(self, kind: str, a: Action, o: Observed, progress: EventFn) -> str:
        """Export on a.source_node, copy through the controller, import on a.node. An image is
        encoded against the images a.node already holds (`image.export_delta`, nephele/node/copies.py),
        so only what it lacks crosses; a node without those ops gets the whole export. A snapshot's
        export is a delta against its image already (which a.node holds: the plan copies it first).
        Both hops resume after a cut link (copy_resuming); a node or transport that cannot resume
        gets whole-file copies."""
        assert a.source_node is not None
        held = sorted({i.content_id for i in o.nodes[a.node].images.values() if i.content_id})
        modes = ["delta", "whole"] if kind == "image" else ["whole"]
        resume = transfer.can_resume(self.transports(a.source_node)) and transfer.can_resume(
            self.transports(a.node)
        )
        for mode in modes:
            if mode == "delta":
                export, imp = "image.export_delta", "image.import_delta"
                what: dict[str, Any] = {"id": a.name, "refs": held}
            else:
                # image.export names its object "id", snapshot.export "name": both given, each reads its own.
                export, imp = f"{kind}.export", f"{kind}.import"
                what = {"id": a.name, "name": a.name}
            try:
                note = None
                if resume:
                    note = self.copy_resuming(kind, a, o, mode, export, imp, what, held, progress)
                if note is None:
                    note = self.copy_whole(kind, a, mode, export, imp, what, progress)
                return f"from {a.source_node}, {note}"
            except _NoSuchOp as exc:
                if mode != modes[-1]:
                    progress(f"{exc.node} has no {exc.op}: copying the whole {kind}")
                    continue
                raise exc.error from None
        raise ActionFailed(f"{a.address}: no way to copy it from {a.source_node}")  # pragma: no cover

    def call_op(self, node: str, op: str, args: Mapping[str, Any], progress: EventFn) -> Any:
        try:
            return self.call(node, op, args, progress)
        except RemoteError as exc:
            if exc.kind == "unsupported":
                raise _NoSuchOp(node, op, exc) from exc
            raise

    def copy_whole(
        self, kind: str, a: Action, mode: str, export: str, imp: str, what: dict[str, Any], progress: EventFn
    ) -> str:
        """Export, fetch and upload whole files under random names (nodes or transports that cannot
        resume)."""
        assert a.source_node is not None
        src_remote = self.tmp_path(a.source_node, kind, a.name)
        res = self.call_op(a.source_node, export, {**what, "dest": src_remote}, progress)
        remote = self.tmp_path(a.node, kind, a.name)
        try:
            sent = int(res.get("file_bytes", 0)) if isinstance(res, dict) else 0
            progress(f"copying {mib(sent) if sent else 'it'} from {a.source_node} through the controller")
            with tempfile.TemporaryDirectory(prefix="nephele-copy-") as tmp:
                local = Path(tmp) / f"{a.name}.zip"
                self.transports(a.source_node).get_file(src_remote, local)
                sent = local.stat().st_size
                self.transports(a.node).put_file(local, remote)
        finally:
            self.discard(a.source_node, src_remote)
        self.call_op(a.node, imp, {"path": remote, "name": a.name}, progress)
        return copy_note(mode, sent, res)

    def copy_resuming(
        self,
        kind: str,
        a: Action,
        o: Observed,
        mode: str,
        export: str,
        imp: str,
        what: dict[str, Any],
        held: list[str],
        progress: EventFn,
    ) -> str | None:
        """The export is made once under a name derived from what it holds (kept on the source until
        fetched, its result recorded under the controller's copies dir), fetched into a controller
        partial named by its sha256, uploaded into a node partial of the same name: a retry after a
        cut link reuses the export and resumes both hops. None: the source node cannot resume."""
        assert a.source_node is not None
        src, parts = a.source_node, self.partials()
        parts.sweep()
        obj = o.nodes[src].images.get(a.name) if kind == "image" else o.nodes[src].snapshots.get(a.name)
        # Per target too: two targets never share (and overwrite) one export or one partial.
        key = transfer.export_key(kind, a.name, src, a.node, obj.content_id if obj else "", mode, held)
        src_remote = f"{self.d.nodes[src].root}/tmp/{transfer.export_name(kind, a.name, key)}"
        ask_src = self.ask_partial(src)
        rec = parts.record(key)
        if rec and parts.complete(key, rec):
            progress(f"the export of the last attempt is here already ({mib(rec['size'])})")
        else:
            if rec:
                have = ask_src({"path": src_remote})
                if have is None:
                    return None
                if have["size"] == rec["size"] and have["sha256"] == rec["digest"]:
                    progress(f"reusing the export of the last attempt on {src} ({mib(rec['size'])})")
                else:  # the export is gone or another one: export again
                    parts.forget(key, rec["digest"])
                    rec = None
            if rec is None:
                if ask_src({"path": src_remote}) is None:  # also sweeps the source's stale partials
                    return None
                res = self.call_op(src, export, {**what, "dest": src_remote}, progress)
                info = ask_src({"path": src_remote})
                if info is None or info["size"] < 0:
                    raise ActionFailed(f"{a.address}: {export} on {src} left no file at {src_remote}")
                rec = {
                    "digest": info["sha256"],
                    "size": info["size"],
                    "result": res if isinstance(res, dict) else {},
                }
                parts.save(key, rec)
                progress(f"copying {mib(rec['size'])} from {src} through the controller")
            transfer.fetch(
                self.transports(src),
                ask_src,
                src_remote,
                parts.part(key, rec["digest"]),
                rec["size"],
                rec["digest"],
                progress,
                resume=self.opts.resume_copies,
                rate_mbit=self.copy_cap(a),
            )
        self.discard(src, src_remote)  # fetched and verified: the source's copy is no longer needed
        local = parts.part(key, rec["digest"])
        remote = f"{self.d.nodes[a.node].root}/tmp/{transfer.part_name(kind, a.name, rec['digest'])}"
        try:
            moved = self.upload_and_import(kind, a, local, remote, imp, progress)
        except _NoSuchOp:  # the target cannot import this kind of export: the caller tries another
            parts.forget(key, rec["digest"])
            self.discard(a.node, remote)
            raise
        except NepheleError as exc:
            if not exc.temporary:  # kept only for a retry, which would fail the same way
                parts.forget(key, rec["digest"])
            raise
        parts.forget(key, rec["digest"])
        return copy_note(mode, rec["size"], rec["result"]) + resumed_note(moved)

    def partials(self) -> transfer.Partials:
        with self._copies_lock:
            if self.copies_dir is None:
                self.copies_dir = Path(tempfile.mkdtemp(prefix="nephele-copies-"))
                self._own_copies_dir = True
        return transfer.Partials(self.copies_dir)

    def handoff(self, a: Action, o: Observed, progress: EventFn) -> str:
        if not a.source_node:
            raise ActionFailed(f"{a.id} has no source node")
        inst = o.nodes[a.source_node].instances.get(a.name)
        return self.handoff_fn(
            HandoffRequest(
                instance=a.name,
                uuid=inst.uuid if inst else "",
                source=self.transports(a.source_node),
                dest=self.transports(a.node),
                source_spec=self.d.nodes[a.source_node],
                dest_spec=self.d.nodes[a.node],
                mode=a.mode or "live",
                downtime_ms=max(1, round(self.d.policy.downtime_budget_s * 1000)),
                progress=progress,
                bandwidth_mbit=bandwidth_cap(
                    self.d.policy, self.d.nodes[a.source_node], self.d.nodes[a.node]
                ),
                timeout_s=self.d.policy.handoff_timeout_s,
                auto_converge=self.d.policy.auto_converge,
            )
        )


# ---------------------------------------------------------------------------------------- executor


def mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def resumed_note(moved: transfer.Moved) -> str:
    """`, resumed at 12.0 MiB of 33.8 MiB` when the upload went on from a partial."""
    return f", resumed at {mib(moved.resumed_at)} of {mib(moved.size)}" if moved.resumed_at else ""


class _NoSuchOp(NepheleError):
    """A node answered `unsupported` for an op of a copy (an older nephele): try another way."""

    def __init__(self, node: str, op: str, error: RemoteError) -> None:
        super().__init__(str(error))
        self.node, self.op, self.error = node, op, error


def copy_note(mode: str, sent: int, res: Any) -> str:
    """`3.1 MiB sent (delta against 1 image it holds; whole: 45.2 MiB)` or `45.2 MiB sent`."""
    if mode != "delta" or not isinstance(res, dict):
        return f"{mib(sent)} sent"
    refs = len(res.get("refs") or [])
    against = (
        f"against {refs} image{'s' if refs != 1 else ''} it holds" if refs else "it holds no related image"
    )
    whole = res.get("whole_bytes")
    return f"{mib(sent)} sent (delta, {against}" + (f"; files: {mib(int(whole))})" if whole else ")")


def short_name(a: Action) -> str:
    return a.name if a.address.startswith("instance/") else a.address


class _Executor:
    def __init__(
        self,
        plan: Plan,
        runner: _Runner,
        options: ApplyOptions,
        *,
        max_handoffs_per_node: int,
        journal: Journal | None,
        inventory: InventoryStore | None,
        say: EventFn,
        sleep: Callable[[float], None],
        clock: Callable[[], float],
        should_start: ShouldStart | None = None,
    ) -> None:
        self.plan = plan
        self.runner = runner
        self.opts = options
        self.max_handoffs_per_node = max(1, max_handoffs_per_node)
        self.journal = journal
        self.inventory = inventory
        self.say = say
        self.sleep = sleep
        self.clock = clock
        self.results = {a.id: ActionResult(a) for a in plan.actions}
        self.ids = set(self.results)
        self.running: dict[str, Action] = {}
        self.should_start = should_start
        self.held: set[str] = set()  # ids should_start kept from starting

    def event(self, name: str, **fields: Any) -> None:
        if self.journal is not None:
            self.journal.event(name, **fields)

    # ------------------------------------------------------------------------------------- limits

    @staticmethod
    def nodes_of(a: Action) -> set[str]:
        return {a.node, *([a.source_node] if a.source_node else [])}

    def can_start(self, a: Action) -> bool:
        if len(self.running) >= max(1, self.opts.parallelism):
            return False
        for n in self.nodes_of(a):
            if sum(1 for r in self.running.values() if n in self.nodes_of(r)) >= max(1, self.opts.per_node):
                return False
        if a.kind is ActionKind.HANDOFF:
            handoffs = [r for r in self.running.values() if r.kind is ActionKind.HANDOFF]
            if len(handoffs) >= max(1, self.plan.max_parallel_handoffs):
                return False
            for n in self.nodes_of(a):
                if sum(1 for r in handoffs if n in self.nodes_of(r)) >= self.max_handoffs_per_node:
                    return False
            earlier = [
                r
                for r in self.results.values()
                if r.action.kind is ActionKind.HANDOFF and (r.action.wave or 0) < (a.wave or 0)
            ]
            if any(r.action.id in self.running or r.status is Status.NOT_RUN for r in earlier):
                return False
        return True

    # ---------------------------------------------------------------------------------------- walk

    def run(self) -> ApplyResult:
        pending = list(self.plan.actions)
        result = ApplyResult(self.plan)
        pool = cf.ThreadPoolExecutor(max_workers=max(1, self.opts.parallelism), thread_name_prefix="apply")
        futures: dict[cf.Future[None], str] = {}
        try:
            while pending or futures:
                self.skip_blocked(pending)
                for a in list(pending):
                    deps = [d for d in a.depends_on if d in self.ids]
                    if all(self.results[d].status in OK for d in deps) and self.can_start(a):
                        pending.remove(a)
                        veto = self.should_start(a) if self.should_start else None
                        if veto:
                            self.held.add(a.id)
                            self.finish(a, Status.NOT_RUN, error=veto)
                            continue
                        self.running[a.id] = a
                        futures[pool.submit(self.attempt_all, a)] = a.id
                if self.held:
                    self.skip_blocked(pending)  # what depends on an action vetoed just now
                if not futures:
                    for a in pending:  # only possible with a dependency cycle: the plan reported it
                        self.finish(a, Status.SKIPPED, error="its dependencies never completed")
                    break
                done, _ = cf.wait(futures, return_when=cf.FIRST_COMPLETED)
                for f in done:
                    aid = futures.pop(f)
                    self.running.pop(aid, None)
                    f.result()  # attempt_all records its own errors; this re-raises only bugs
        except KeyboardInterrupt:
            result.interrupted = True
            self.say(f"Interrupted: waiting for {len(futures)} running action(s) to finish...")
            pool.shutdown(wait=True, cancel_futures=True)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        result.results = [self.results[a.id] for a in self.plan.actions]
        return result

    def skip_blocked(self, pending: list[Action]) -> None:
        changed = True
        while changed:
            changed = False
            for a in list(pending):
                bad = [
                    d
                    for d in a.depends_on
                    if d in self.ids and self.results[d].status in (Status.FAILED, Status.SKIPPED)
                ]
                held = [d for d in a.depends_on if d in self.held]
                if held and not bad:
                    pending.remove(a)
                    self.held.add(a.id)
                    self.finish(a, Status.NOT_RUN, error=f"not started: it depends on {held[0]}, not started")
                    changed = True
                elif bad:
                    pending.remove(a)
                    self.finish(
                        a, Status.SKIPPED, error=f"skipped: it depends on {bad[0]}, which did not succeed"
                    )
                    changed = True

    def finish(self, a: Action, status: Status, *, error: str | None = None, detail: str = "") -> None:
        r = self.results[a.id]
        r.status, r.error, r.detail = status, error, detail
        self.event(status.value, action=a.id, attempts=r.attempts, error=error, detail=detail)
        name = short_name(a)
        what = headline(a)
        if status is Status.SKIPPED or (status is Status.NOT_RUN and error):
            self.say(f"{name}: {what} … {error}")

    def backoff(self, attempt: int) -> float:
        return float(min(self.opts.backoff_max, self.opts.backoff_initial * 2 ** (attempt - 1)))

    def attempt_all(self, a: Action) -> None:
        r = self.results[a.id]
        name, what = short_name(a), headline(a)
        t0 = self.clock()
        self.say(f"{name}: {what} …")

        def progress(line: str) -> None:
            line = line.strip()
            if line:
                self.say(f"{name}: {what} … {line}")

        while True:
            r.attempts += 1
            self.event("start", action=a.id, attempt=r.attempts)
            try:
                detail = self.runner.run(a, progress)
            except NepheleError as exc:
                temporary = exc.temporary and r.attempts <= self.opts.retries
                if temporary:
                    delay = self.backoff(r.attempts)
                    self.event("retry", action=a.id, attempt=r.attempts, delay=delay, error=str(exc))
                    self.say(
                        f"{name}: {what} … temporary error, retrying in {delay:g} s "
                        f"(attempt {r.attempts + 1} of {self.opts.retries + 1}): {exc}"
                    )
                    self.sleep(delay)
                    continue
                r.seconds = self.clock() - t0
                why = str(exc)
                if exc.temporary:
                    why = f"gave up after {r.attempts} attempts: {why}"
                self.finish(a, Status.FAILED, error=why)
                self.say(f"{name}: {what} … FAILED: {why}")
                return
            except Exception as exc:  # a bug in one action must not hide the others
                r.seconds = self.clock() - t0
                why = f"internal error: {type(exc).__name__}: {exc}"
                self.finish(a, Status.FAILED, error=why)
                self.say(f"{name}: {what} … FAILED: {why}")
                return
            r.seconds = self.clock() - t0
            status = Status.NOOP if detail == NOOP else Status.DONE
            if self.inventory is not None:
                self.inventory.record(a)
            self.finish(a, status, detail="" if status is Status.NOOP else detail)
            note = "already done, nothing to do" if status is Status.NOOP else f"done in {r.seconds:.1f} s"
            if detail and status is Status.DONE and detail not in ("started",):
                note += f" ({detail})"
            self.say(f"{name}: {what} … {note}")
            return


def apply(
    plan: Plan,
    desired: Desired,
    transports: Transports,
    options: ApplyOptions | None = None,
    *,
    journal: Journal | None = None,
    inventory: InventoryStore | None = None,
    say: EventFn = print,
    handoff_fn: HandoffFn = live_handoff,
    base_dir: Path | None = None,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
    should_start: ShouldStart | None = None,
) -> ApplyResult:
    """Carry out `plan` on the nodes of `desired`. A plan with errors is refused (PlanError). Returns
    what happened to every action; never raises for an action's failure (see ApplyResult.ok)."""
    if plan.errors:
        raise PlanError(
            "the plan has errors and cannot be applied: " + "; ".join(e.message for e in plan.errors)
        )
    if plan.manifest != desired.name:
        raise PlanError(f"the plan is for manifest {plan.manifest!r}, not {desired.name!r}")
    opts = options or ApplyOptions()
    lock = threading.Lock()

    def locked_say(line: str) -> None:
        with lock:
            say(line)

    base = base_dir or (Path(desired.source).resolve().parent if desired.source else Path.cwd())
    if opts.copies_dir is None and inventory is not None:
        opts = dataclasses.replace(opts, copies_dir=inventory.path.parent / "copies")
    runner = _Runner(desired, transports, opts, handoff_fn, base, locked_say)
    ex = _Executor(
        plan,
        runner,
        opts,
        max_handoffs_per_node=desired.policy.max_handoffs_per_node,
        journal=journal,
        inventory=inventory,
        say=locked_say,
        sleep=sleep,
        clock=clock,
        should_start=should_start,
    )
    try:
        return ex.run()
    finally:
        if runner._own_copies_dir and runner.copies_dir is not None:
            shutil.rmtree(runner.copies_dir, ignore_errors=True)
