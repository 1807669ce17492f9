"""`nephele status`: conditions per instance, the manifest revision (git or sha256), last errors."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
from fakenodes import FakeCloudlet

from nephele.cli import cmd_apply, cmd_status
from nephele.cli.main import main
from nephele.reconcile import locks
from nephele.reconcile.controller import revision

MANIFEST = """\
apiVersion: nephele.dev/v1
kind: Cloudlet
metadata: {name: demo}
nodes:
  edge-a: {address: 10.0.0.1}
  edge-b: {address: 10.0.0.2}
images:
  tiny: {source: tiny.zip}
snapshots:
  web: {image: tiny, source: web.zip}
instances:
  ready: {snapshot: web, node: edge-a, ports: ["8080:80"]}
  moved: {snapshot: web, node: edge-a}
  paused: {snapshot: web, node: edge-a, state: paused}
  ports: {snapshot: web, node: edge-a, ports: ["9000:80"]}
  dark: {snapshot: web, node: edge-b}
  missing: {snapshot: web, node: edge-a}
"""


@pytest.fixture
def setup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, FakeCloudlet]:
    path = tmp_path / "cloudlet.yaml"
    path.write_text(MANIFEST)
    fc = FakeCloudlet("edge-a", "edge-b")
    for mod in (cmd_apply, cmd_status):
        monkeypatch.setattr(mod, "TRANSPORT_FACTORY", fc.factory)
    monkeypatch.delenv("NEPHELE_STATE_DIR", raising=False)
    fc.add_instance("edge-a", "ready", ports=["8080:80"])
    fc.add_instance("edge-b", "moved")
    fc.add_instance("edge-a", "paused")
    fc.add_instance("edge-a", "ports", ports=["9001:80"])
    fc.down = {"edge-b"}
    return path, fc


def status(capsys: Any, path: Path, *extra: str) -> tuple[int, str]:
    code = main(["status", "-f", str(path), *extra])
    return code, capsys.readouterr().out


def test_conditions(setup: tuple[Path, FakeCloudlet], capsys: Any) -> None:
    path, fc = setup
    code, out = status(capsys, path, "-o", "json")
    assert code == 1
    doc = json.loads(out)
    got = {i["name"]: (i["condition"], i["reason"]) for i in doc["instances"]}
    assert got["ready"] == ("Ready", "")
    assert got["paused"] == ("Degraded", "running, the manifest says paused")
    assert got["ports"] == ("Degraded", "ports 9001:80, the manifest says 9000:80")
    assert got["missing"] == ("Degraded", "not on any node (desired on edge-a)")
    assert got["dark"][0] == "Unknown" and got["dark"][1].startswith("node edge-b is unreachable")
    # edge-b is dark, so 'moved' (which runs there) is not seen anywhere: Degraded (missing) here.
    fc.down = set()
    doc = json.loads(status(capsys, path, "-o", "json")[1])
    got = {i["name"]: (i["condition"], i["reason"]) for i in doc["instances"]}
    assert got["moved"] == ("Degraded", "on edge-b, the manifest places it on edge-a")
    assert doc["instances"][0]["actual"]["node"] == "edge-a"
    assert doc["last_applied"] is None and doc["revision"]["sha256"]


def test_text_and_running_apply(setup: tuple[Path, FakeCloudlet], capsys: Any) -> None:
    path, _fc = setup
    held = locks.acquire(path.parent / ".nephele" / "demo", "demo")
    code, out = status(capsys, path)
    assert code == 1
    assert f"Apply running: {held.holder}" in out
    assert "INSTANCE" in out and "CONDITION" in out
    lines = {
        line.split()[0]: line for line in out.splitlines() if line and line.split()[0] in ("ready", "paused")
    }
    assert "Ready" in lines["ready"]
    assert "Progressing" in lines["paused"] and "an apply is running" in lines["paused"]
    assert "Unreachable nodes:" in out and "edge-b: since" in out
    assert "Ready: 1 of 6 instance(s)" in out


def test_last_error_is_shown_until_fixed(setup: tuple[Path, FakeCloudlet], capsys: Any) -> None:
    path, _fc = setup
    state = path.parent / ".nephele" / "demo"
    state.mkdir(parents=True)
    (state / "status.json").write_text(
        json.dumps({"errors": {"instance/paused": "node edge-a: pause failed", "instance/ready": "old news"}})
    )
    doc = json.loads(status(capsys, path, "-o", "json")[1])
    by = {i["name"]: i for i in doc["instances"]}
    assert by["paused"]["last_error"] == "node edge-a: pause failed"
    assert by["paused"]["reason"].endswith("last apply failed on it")
    assert by["ready"]["last_error"] is None  # Ready now: a past error is history
    out = status(capsys, path)[1]
    assert "Last errors:\n  paused: node edge-a: pause failed" in out


def test_all_ready_exits_zero(tmp_path: Path, capsys: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(
        "apiVersion: nephele.dev/v1\nkind: Cloudlet\nmetadata: {name: demo}\n"
        "nodes:\n  a: {address: 10.0.0.1}\n"
        "images:\n  tiny: {source: t.zip}\nsnapshots:\n  web: {image: tiny, source: w.zip}\n"
        "instances:\n  one: {snapshot: web, node: a}\n"
    )
    fc = FakeCloudlet("a")
    fc.add_instance("a", "one")
    monkeypatch.setattr(cmd_status, "TRANSPORT_FACTORY", fc.factory)
    monkeypatch.delenv("NEPHELE_STATE_DIR", raising=False)
    code, out = status(capsys, path)
    assert code == 0 and "Ready: 1 of 1 instance(s) (1 Ready)." in out


def test_revision_is_the_git_commit_with_a_dirty_flag(tmp_path: Path) -> None:
    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t", *args],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()

    path = tmp_path / "cloudlet.yaml"
    path.write_text("a: 1\n")
    assert revision(str(path), b"a: 1\n")["text"].startswith("sha256:")
    git("init", "-q", "-b", "main")
    git("add", "cloudlet.yaml")
    git("commit", "-q", "-m", "m")
    head = git("rev-parse", "HEAD")
    rev = revision(str(path), path.read_bytes())
    assert rev["git_commit"] == head and rev["git_dirty"] is False
    assert rev["text"] == f"main@sha1:{head[:12]}"
    path.write_text("a: 2\n")
    rev = revision(str(path), path.read_bytes())
    assert rev["git_dirty"] is True and rev["text"].endswith("(uncommitted changes)")
