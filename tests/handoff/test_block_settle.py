"""The source's wait for an earlier failed attempt's disk-mirror job (handoff/source._settle_block_layer):
libvirt's next mirror fails with "Need a root block node" while that job's filter node is in place."""

from __future__ import annotations

from typing import Any

import pytest

from nephele.errors import Conflict
from nephele.handoff import source
from nephele.node import migrate


class _Ctx:
    hv: Any = object()

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.log = _Log()

    def progress(self, line: str) -> None:
        self.lines.append(line)


class _Log:
    def warning(self, *_a: Any) -> None:
        pass


def _states(monkeypatch: pytest.MonkeyPatch, seq: list[dict[str, Any]]) -> list[list[str]]:
    dismissed: list[list[str]] = []
    it = iter(seq)
    last = {"jobs": [], "filters": []}

    def state(_hv: Any, _uuid: str) -> dict[str, Any]:
        nonlocal last
        last = next(it, last)
        return last

    def dismiss(_hv: Any, _uuid: str, st: dict[str, Any]) -> list[str]:
        done = [j["id"] for j in st["jobs"] if j["status"] == "concluded"]
        if done:
            dismissed.append(done)
            st["jobs"] = [j for j in st["jobs"] if j["status"] != "concluded"]
        return done

    monkeypatch.setattr(migrate, "block_state", state)
    monkeypatch.setattr(migrate, "dismiss_concluded", dismiss)
    monkeypatch.setattr(source.time, "sleep", lambda _s: None)
    return dismissed


RUNNING = {"jobs": [{"id": "drive-virtio-disk0", "type": "mirror", "status": "aborting"}], "filters": ["top"]}
CLEAN: dict[str, Any] = {"jobs": [], "filters": []}


def test_a_clean_block_layer_starts_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    _states(monkeypatch, [CLEAN])
    ctx = _Ctx()
    source._settle_block_layer(ctx, "u", "web-1")  # type: ignore[arg-type]
    assert ctx.lines == []


def test_a_winding_down_mirror_is_waited_for(monkeypatch: pytest.MonkeyPatch) -> None:
    _states(monkeypatch, [dict(RUNNING), dict(RUNNING), CLEAN])
    ctx = _Ctx()
    source._settle_block_layer(ctx, "u", "web-1")  # type: ignore[arg-type]
    assert len(ctx.lines) == 1 and "wind down" in ctx.lines[0] and "aborting" in ctx.lines[0]


def test_an_undismissed_ended_job_is_dismissed(monkeypatch: pytest.MonkeyPatch) -> None:
    ended = {"jobs": [{"id": "drive-virtio-disk0", "type": "mirror", "status": "concluded"}], "filters": []}
    dismissed = _states(monkeypatch, [ended, CLEAN])
    ctx = _Ctx()
    source._settle_block_layer(ctx, "u", "web-1")  # type: ignore[arg-type]
    assert dismissed == [["drive-virtio-disk0"]] and "Dismissed" in ctx.lines[0]


def test_a_job_that_never_ends_refuses_the_handoff_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    _states(monkeypatch, [dict(RUNNING)])
    clock = iter(range(0, 10_000, 5))
    monkeypatch.setattr(source.time, "monotonic", lambda: float(next(clock)))
    with pytest.raises(Conflict, match=r"'web-1'.*drive-virtio-disk0.*earlier handoff"):
        source._settle_block_layer(_Ctx(), "u", "web-1")  # type: ignore[arg-type]
