"""Saved plans (`nephele plan -out FILE`) and the stale-plan check that apply runs before acting.

A plan file is JSON: {"format": PLANFILE_FORMAT, "manifest": {"path", "sha256"}, "plan": <plan JSON>}.
Apply will refuse a plan whose manifest changed (hash) or whose preconditions no longer hold
(`stale_preconditions`, pure: it only compares the plan with a fresh observation).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nephele.errors import PlanError, StalePlanError
from nephele.model import InstanceState, Observed
from nephele.reconcile.actions import Fact, Plan, Precondition

PLANFILE_FORMAT = "nephele.planfile/v1"


@dataclass(frozen=True)
class SavedPlan:
    plan: Plan
    manifest_path: str
    manifest_sha256: str


def manifest_hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def dumps(saved: SavedPlan) -> str:
    doc: dict[str, Any] = {
        "format": PLANFILE_FORMAT,
        "manifest": {"path": saved.manifest_path, "sha256": saved.manifest_sha256},
        "plan": saved.plan.to_dict(),
    }
    return json.dumps(doc, indent=2, ensure_ascii=False) + "\n"


def loads(text: str, where: str = "<plan>") -> SavedPlan:
    try:
        doc = json.loads(text)
        if not isinstance(doc, dict):
            raise ValueError("not a JSON object")
        if doc.get("format") != PLANFILE_FORMAT:
            raise ValueError(f"format is {doc.get('format')!r}, expected {PLANFILE_FORMAT!r}")
        manifest = doc["manifest"]
        return SavedPlan(Plan.from_dict(doc["plan"]), str(manifest["path"]), str(manifest["sha256"]))
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        detail = f"missing field {exc}" if isinstance(exc, KeyError) else str(exc)
        raise PlanError(f"{where}: not a nephele plan file: {detail}") from exc


def save(path: str | Path, saved: SavedPlan) -> None:
    """Write atomically: a reader never sees half a plan, and a failure leaves no file behind."""
    target = Path(path)
    text = dumps(saved)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent or ".")
    except OSError as exc:
        raise PlanError(f"{target}: cannot write the plan file: {exc.strerror or exc}") from exc
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, target)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise PlanError(f"{target}: cannot write the plan file: {exc.strerror or exc}") from exc


def load(path: str | Path) -> SavedPlan:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise PlanError(f"{path}: cannot read the plan file: {exc}") from exc
    return loads(text, str(path))


def check_manifest(saved: SavedPlan, manifest_bytes: bytes) -> None:
    """Raise StalePlanError when the manifest is not the one the plan was made from."""
    if manifest_hash(manifest_bytes) != saved.manifest_sha256:
        raise StalePlanError(
            f"the manifest {saved.manifest_path} changed since this plan was made; run nephele plan again"
        )


def _violation(p: Precondition, observed: Observed) -> str | None:
    """Why `p` no longer holds in `observed`, or None if it still does."""
    node = observed.nodes.get(p.node)
    if node is None:
        return f"node {p.node} is not in the observation"
    if not node.reachable:
        return f"node {p.node} is unreachable ({node.error or 'no answer'})"
    match p.fact:
        case Fact.IMAGE_PRESENT:
            img = node.images.get(p.name)
            if img is None:
                return "the image is gone"
            if p.content_id and img.content_id != p.content_id:
                return f"its content id is now {img.content_id[:12]}"
        case Fact.IMAGE_ABSENT:
            if p.name in node.images:
                return "the image is there now"
        case Fact.SNAPSHOT_PRESENT:
            snap = node.snapshots.get(p.name)
            if snap is None:
                return "the snapshot is gone"
            if p.content_id and snap.content_id != p.content_id:
                return f"its content id is now {snap.content_id[:12]}"
        case Fact.SNAPSHOT_ABSENT:
            if p.name in node.snapshots:
                return "the snapshot is there now"
        case Fact.INSTANCE:
            inst = node.instances.get(p.name)
            if inst is None:
                return "the instance is gone"
            if p.uuid and inst.uuid != p.uuid:
                return f"it is another instance now (uuid {inst.uuid})"
            if p.state and inst.state is not InstanceState(p.state):
                return f"it is {inst.state.value} now"
        case Fact.INSTANCE_ABSENT:
            if p.name in node.instances:
                inst = node.instances[p.name]
                return f"it exists now ({inst.state.value}, uuid {inst.uuid})"
        case Fact.PORT_FREE:
            for inst in node.instances.values():
                if inst.state is not InstanceState.STOPPED and any(m.host == p.port for m in inst.ports):
                    return f"instance {inst.name} holds it now"
    return None


def stale_preconditions(plan: Plan, observed: Observed) -> list[str]:
    """Every precondition of every action that a fresh observation contradicts, as
    `ACTION_ID: expected FACT, but REASON`. Empty: the plan may still be applied."""
    out: list[str] = []
    for a in plan.actions:
        for p in a.preconditions:
            why = _violation(p, observed)
            if why:
                out.append(f"{a.id}: expected {p.describe()}, but {why}")
    return out
