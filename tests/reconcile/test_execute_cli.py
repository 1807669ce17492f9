"""`nephele apply` / `force-unlock` / `plan` (live) through the CLI, on a fake cloudlet."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from fakenodes import FakeCloudlet

from nephele.cli import cmd_apply, cmd_plan, cmd_status
from nephele.cli.main import main
from nephele.errors import LockHeld, NepheleError
from nephele.reconcile import locks

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
  web-1: {snapshot: web, node: edge-a, ports: ["8080:80"]}
policy: {prune: true}
"""


@pytest.fixture
def setup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, FakeCloudlet]:
    (tmp_path / "tiny.zip").write_bytes(b"image")
    (tmp_path / "web.zip").write_bytes(b"snapshot")
    path = tmp_path / "cloudlet.yaml"
    path.write_text(MANIFEST)
    fc = FakeCloudlet("edge-a", "edge-b")
    for mod in (cmd_apply, cmd_plan, cmd_status):
        monkeypatch.setattr(mod, "TRANSPORT_FACTORY", fc.factory)
    monkeypatch.setattr(cmd_apply, "is_terminal", lambda: False)
    monkeypatch.delenv("NEPHELE_STATE_DIR", raising=False)
    monkeypatch.chdir(tmp_path)
    return path, fc


def cli(capsys: Any, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def state(path: Path) -> Path:
    return path.parent / ".nephele" / "demo"


def test_apply_then_reapply_is_a_noop(setup: tuple[Path, FakeCloudlet], capsys: Any) -> None:
    path, fc = setup
    code, out, err = cli(capsys, "apply", "-f", str(path), "--auto-approve")
    assert code == 0, err
    assert "nephele will perform the following actions" in out
    assert "web-1: start on edge-a" in out
    assert out.rstrip().endswith(
        "Apply complete: 1 started, 0 changed, 0 handed off, 0 stopped, 0 pruned, 3 imported."
    )
    assert len(fc.find("web-1")) == 1
    assert not (state(path) / "lock.json").exists()
    record = json.loads((state(path) / "status.json").read_text())
    assert record["last_applied"]["revision"].startswith(("sha256:", "HEAD@", "main@", "master@"))
    code, out, _ = cli(capsys, "apply", "-f", str(path), "--auto-approve")
    assert code == 0 and "No changes. The cloudlet matches the manifest." in out
    assert len(fc.find("web-1")) == 1 and fc.made == ["web-1"]


def test_not_a_terminal_needs_auto_approve(setup: tuple[Path, FakeCloudlet], capsys: Any) -> None:
    path, fc = setup
    code, _out, err = cli(capsys, "apply", "-f", str(path))
    assert code == 1
    assert "stdin is not a terminal: nothing was done" in err and "--auto-approve" in err
    assert fc.mutations() == []
    assert not (state(path) / "lock.json").exists()


def test_confirmation_on_a_terminal(
    setup: tuple[Path, FakeCloudlet], capsys: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    path, fc = setup
    monkeypatch.setattr(cmd_apply, "is_terminal", lambda: True)
    monkeypatch.setattr("builtins.input", lambda: "y")
    code, out, _ = cli(capsys, "apply", "-f", str(path))
    assert code == 1 and "Only 'yes' will be accepted" in out and "Apply cancelled" in out
    assert fc.mutations() == []
    monkeypatch.setattr("builtins.input", lambda: "yes")
    code, out, _ = cli(capsys, "apply", "-f", str(path))
    assert code == 0 and "Apply complete" in out


def test_dry_run_touches_nothing(setup: tuple[Path, FakeCloudlet], capsys: Any) -> None:
    path, fc = setup
    fc.down = {"edge-b"}  # would be remembered as 'unreachable since' by a real apply
    code, out, _ = cli(capsys, "apply", "-f", str(path), "--dry-run")
    assert code == 0
    assert "web-1: start on edge-a" not in out and "+ instance/web-1" in out
    assert "Dry run: nothing was changed." in out
    assert fc.mutations() == []
    assert not (path.parent / ".nephele").exists()


def test_bad_manifest_is_rejected_before_any_node_is_contacted(
    setup: tuple[Path, FakeCloudlet], capsys: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    path, _ = setup

    def never(spec: Any) -> Any:
        raise AssertionError("a transport was made for a bad manifest")

    monkeypatch.setattr(cmd_apply, "TRANSPORT_FACTORY", never)
    path.write_text(MANIFEST.replace("node: edge-a", "node: edge-c"))
    code, out, err = cli(capsys, "apply", "-f", str(path), "--auto-approve")
    assert code == 1 and out == ""
    assert "cloudlet.yaml:12:32: instances.web-1.node:" in err and "edge-c" in err
    assert not (path.parent / ".nephele").exists()


def test_lock_held_fails_fast_naming_the_holder(setup: tuple[Path, FakeCloudlet], capsys: Any) -> None:
    path, fc = setup
    held = locks.acquire(state(path), "demo")
    code, _, err = cli(capsys, "apply", "-f", str(path), "--auto-approve")
    assert code == 1
    assert f"lock {held.id} held by {held.holder} (pid {os.getpid()}, apply)" in err
    assert f"nephele force-unlock {held.id}" in err
    assert fc.mutations() == [] and fc.calls == []  # refused before observing
    code, out, _ = cli(capsys, "force-unlock", held.id, "-f", str(path))
    assert code == 0 and f"Removed lock {held.id}" in out
    code, _, _ = cli(capsys, "apply", "-f", str(path), "--auto-approve")
    assert code == 0


def test_stale_lock_is_named_stale_and_force_unlock_checks_the_id(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    dead_pid = int(proc.stdout)
    info = locks.acquire(tmp_path, "demo")
    data = json.loads((tmp_path / "lock.json").read_text())
    data["pid"] = dead_pid
    (tmp_path / "lock.json").write_text(json.dumps(data))
    with pytest.raises(LockHeld, match="no longer running, so the lock is stale"):
        locks.acquire(tmp_path, "demo")
    with pytest.raises(NepheleError, match=f"the lock held is {info.id}"):
        locks.force_unlock(tmp_path, "000000000000")
    locks.force_unlock(tmp_path, info.id)
    assert locks.read(tmp_path) is None


def test_release_leaves_someone_elses_lock(tmp_path: Path) -> None:
    mine = locks.acquire(tmp_path, "demo")
    locks.force_unlock(tmp_path, mine.id)
    theirs = locks.acquire(tmp_path, "demo")
    locks.release(tmp_path, mine)
    assert locks.read(tmp_path) == theirs


def test_saved_plan_applied_exactly(setup: tuple[Path, FakeCloudlet], capsys: Any) -> None:
    path, fc = setup
    code, _, err = cli(capsys, "plan", "-f", str(path), "-out", "plan.json")
    assert code == 0, err
    assert fc.mutations() == []
    code, out, err = cli(capsys, "apply", "plan.json")
    assert code == 0, err
    assert "Apply complete: 1 started" in out
    assert len(fc.find("web-1")) == 1


def test_stale_saved_plan_is_refused(setup: tuple[Path, FakeCloudlet], capsys: Any) -> None:
    path, fc = setup
    assert cli(capsys, "plan", "-f", str(path), "-out", "plan.json")[0] == 0
    fc.add_image("edge-a")  # the import's precondition (image absent) no longer holds
    code, _out, err = cli(capsys, "apply", "plan.json")
    assert code == 1
    assert "the saved plan no longer matches the nodes; nothing was done" in err
    assert "import_image:image/tiny@edge-a: expected image tiny absent from edge-a" in err
    assert fc.mutations() == []


def test_saved_plan_refused_when_the_manifest_changed(setup: tuple[Path, FakeCloudlet], capsys: Any) -> None:
    path, fc = setup
    assert cli(capsys, "plan", "-f", str(path), "-out", "plan.json")[0] == 0
    fc.calls.clear()
    path.write_text(MANIFEST.replace("8080:80", "8081:80"))
    code, _, err = cli(capsys, "apply", "plan.json")
    assert code == 1 and "changed since this plan was made" in err
    assert fc.calls == []


def test_json_output(setup: tuple[Path, FakeCloudlet], capsys: Any) -> None:
    path, fc = setup
    fc.faults[("edge-a", "instance.run")] = [NepheleError("boom")]
    code, out, err = cli(capsys, "apply", "-f", str(path), "--auto-approve", "-o", "json")
    assert code == 1
    doc = json.loads(out)  # stdout is only the JSON document; progress went to stderr
    assert doc["plan"]["format_version"] == "1" and doc["dry_run"] is False
    assert doc["result"]["ok"] is False
    failed = [a for a in doc["result"]["actions"] if a["status"] == "failed"]
    assert [a["id"] for a in failed] == ["start_instance:instance/web-1"] and failed[0]["error"] == "boom"
    assert "Apply failed: 1 failed" in err
    record = json.loads((state(path) / "status.json").read_text())
    assert record["errors"] == {"instance/web-1": "boom"} and "last_applied" not in record


def test_target_limits_the_apply(setup: tuple[Path, FakeCloudlet], capsys: Any) -> None:
    path, fc = setup
    code, _out, _ = cli(capsys, "apply", "-f", str(path), "--auto-approve", "--target", "image/tiny")
    assert code == 0
    assert {op for _, op in fc.mutations()} == {"image.import"}
    assert fc.find("web-1") == []


def test_plan_observes_live_nodes(setup: tuple[Path, FakeCloudlet], capsys: Any) -> None:
    path, fc = setup
    fc.down = {"edge-b"}
    code, out, _ = cli(capsys, "plan", "-f", str(path))
    assert code == 0
    assert "+ instance/web-1" in out
    assert "node edge-b is unreachable since" in out and "connection refused" in out
    assert not (path.parent / ".nephele").exists()  # plan writes no state


def test_usage_errors_touch_nothing(setup: tuple[Path, FakeCloudlet], capsys: Any) -> None:
    path, fc = setup
    code, _, err = cli(capsys, "apply", "-f", str(path), "--auto-approve", "--parallelism", "0")
    assert code == 1 and "--parallelism must be at least 1" in err
    code, _, err = cli(capsys, "apply", "-f", str(path), "plan.json")
    assert code == 1 and "not both" in err
    code, _, err = cli(capsys, "apply")
    assert code == 1 and "give either -f MANIFEST or a PLANFILE" in err
    assert fc.calls == [] and not (path.parent / ".nephele").exists()
