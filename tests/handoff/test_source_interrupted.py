"""The source of a handoff interrupted (the controller killed: SIGHUP raises KeyboardInterrupt in the
agent) after libvirt had already completed the migration: the domain is gone from this node, so the
instance directory must go too, as after a completed handoff; interrupted before completion, the VM
stays and so does its directory. libvirt and the network are faked at handoff/source.py's seams."""

from __future__ import annotations

import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from nephele.errors import HandoffError
from nephele.handoff import source
from nephele.node import migrate

UUID = "4aebf844-da29-4d54-8203-76cfddce7daf"


class _Migration:
    """A migration in flight; the signal lands in the source's loop (job()), after libvirt completed it
    (`completes`) or while it still ran (then the source's abort ends it with an error)."""

    def __init__(self, *_a: Any, completes: bool, **_kw: Any) -> None:
        self.done = threading.Event()
        self.error: str | None = None
        self.completes = completes
        self.aborted = False

    def start(self) -> None:
        pass

    def job(self) -> dict[str, Any]:
        if self.completes:
            self.done.set()
        raise KeyboardInterrupt("signal 1")

    def throttle_pct(self, _stats: dict[str, Any]) -> int:
        return 0

    def set_downtime(self, _ms: int) -> None:
        pass

    def abort(self) -> None:
        self.aborted = True
        self.error = "operation aborted: job 'migration out' canceled by client"
        self.done.set()


class _Store:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.removed: list[str] = []

    def remove_instance_dir(self, uuid: str) -> None:
        self.removed.append(uuid)


class _Log:
    def warning(self, *_a: Any) -> None:
        pass


def _send(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, *, completed: bool) -> tuple[_Store, str]:
    info = SimpleNamespace(state="running", tags={"title": "web-1", "image": "ab" * 32})
    monkeypatch.setattr(source.instances, "select", lambda _ctx, _uuid: info)
    monkeypatch.setattr(source.images, "resolve", lambda _store, _id: SimpleNamespace())
    monkeypatch.setattr(source.refsmod, "prepare", lambda _store, _image: {})
    monkeypatch.setattr(source, "_settle_block_layer", lambda *_a: None)
    monkeypatch.setattr(migrate, "watch_lifecycle", lambda *_a: lambda: None)
    # the domain is gone once the migration completed; still here (running) when it did not
    monkeypatch.setattr(migrate, "resume_if_paused", lambda _hv, _uuid: None if completed else "running")
    monkeypatch.setattr(migrate, "block_state", lambda _hv, _uuid: {"jobs": [], "filters": []})
    monkeypatch.setattr(
        migrate, "SourceMigration", lambda *a, **kw: _Migration(*a, completes=completed, **kw)
    )
    store = _Store(tmp_path)
    hv = SimpleNamespace(
        lookup=lambda _uuid: object(), set_tags=lambda _dom, _tags: None, info=lambda _dom: info
    )
    ctx = SimpleNamespace(hv=hv, store=store, progress=lambda _line: None, log=_Log())
    args = {
        "uuid": UUID,
        "dest_address": "127.0.0.1",
        "dest_port": 9,
        "handoff_id": "00" * 16,
        "token": "00" * 32,
        "memory_port": 0,
        "disk_port": 0,
    }
    with pytest.raises(HandoffError) as err:
        source.send(ctx, args)  # type: ignore[arg-type]
    return store, str(err.value)


def test_interrupted_after_the_migration_completed_releases_the_instance_dir(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    store, msg = _send(monkeypatch, tmp_path, completed=True)
    assert store.removed == [UUID]
    assert (
        msg
        == "the source was interrupted after the migration completed: the instance runs on the destination"
    )


def test_interrupted_before_completion_keeps_the_instance(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    store, msg = _send(monkeypatch, tmp_path, completed=False)
    assert store.removed == []
    assert "the instance is running here" in msg
