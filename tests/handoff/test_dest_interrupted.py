"""The receiver of a handoff stopped after libvirt had completed the migration (the controller killed:
SIGHUP in the agent, or the receiver SIGKILLed): the domain runs here, so it is the instance now, and the
source's "being handed off" mark its migrated XML carries must go, as after a completed handoff. Before,
the mark stayed: `observe` showed the instance as being handed off for good. libvirt is faked at
handoff/dest.py's seams."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from nephele.handoff import dest
from nephele.node import migrate
from nephele.node.store import Store

UUID = "4aebf844-da29-4d54-8203-76cfddce7daf"
MIGRATED_TAGS = {
    "title": "web-1",
    "ports": "8080:80",
    "handoff_url": "tcp://10.0.0.1:7000",
    "handoff_pid": "42",
}


class _Hypervisor:
    def __init__(self) -> None:
        self.tags = dict(MIGRATED_TAGS)

    def lookup(self, uuid: str) -> str:
        return f"domain {uuid}"

    def info(self, _dom: Any) -> SimpleNamespace:
        return SimpleNamespace(tags=dict(self.tags), name="nephele-web-1")

    def set_tags(self, _dom: Any, tags: dict[str, str]) -> None:
        self.tags = dict(tags)


def dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


@pytest.fixture
def node(tmp_path: Path) -> SimpleNamespace:
    store = Store(tmp_path / "root")
    inst = store.instance_dir(UUID)
    inst.mkdir(parents=True)
    (inst / dest.INCOMING).write_text(str(dead_pid()))
    return SimpleNamespace(hv=_Hypervisor(), store=store, inst=inst)


def assert_adopted(node: SimpleNamespace) -> None:
    assert node.hv.tags == {"title": "web-1", "ports": "8080:80"}
    recorded = json.loads((node.inst / "instance.json").read_text())
    assert recorded == {"uuid": UUID, "name": "nephele-web-1", "title": "web-1", "ports": "8080:80"}
    assert not (node.inst / dest.INCOMING).exists()


def test_an_interrupted_receiver_whose_domain_runs_adopts_it(
    node: SimpleNamespace, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(migrate, "domain_state", lambda _hv, _uuid: "running")
    said: list[str] = []
    dest._cleanup(node, UUID, node.inst, SimpleNamespace(log=said.append))  # type: ignore[arg-type]
    assert_adopted(node)
    assert said == ["the domain runs here although the handoff failed: it is the instance now"]


def test_the_sweep_adopts_a_running_domain_a_killed_receiver_left(
    node: SimpleNamespace, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(migrate, "domain_state", lambda _hv, _uuid: "running")
    assert str(node.inst) not in dest.sweep_stale(node)  # type: ignore[arg-type]
    assert_adopted(node)


@pytest.mark.parametrize("state", ["paused", None])
def test_the_sweep_leaves_a_domain_that_does_not_run_as_it_was(
    node: SimpleNamespace, monkeypatch: pytest.MonkeyPatch, state: str | None
) -> None:
    monkeypatch.setattr(migrate, "domain_state", lambda _hv, _uuid: state)
    removed = dest.sweep_stale(node)  # type: ignore[arg-type]
    assert node.hv.tags == MIGRATED_TAGS
    if state is None:  # nothing of the instance here: the incoming directory goes
        assert str(node.inst) in removed and not node.inst.exists()
    else:
        assert (node.inst / dest.INCOMING).exists() and not (node.inst / "instance.json").exists()
