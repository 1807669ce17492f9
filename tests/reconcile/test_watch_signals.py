"""SIGTERM handling of `nephele watch`, in a subprocess on a fake cloudlet (watch_fake_daemon.py):
the first signal lets the running action finish, starts nothing new and exits 0; a second one exits at
once, and the next start reports what was left in flight, breaks its own stale lock and goes on."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from nephele.reconcile import events as eventlog
from nephele.reconcile.journal import read_events

SCRIPT = Path(__file__).with_name("watch_fake_daemon.py")
MANIFEST = """\
apiVersion: nephele.dev/v1
kind: Cloudlet
metadata: {name: demo}
nodes:
  edge-a: {address: 10.0.0.1}
images:
  tiny: {source: tiny.zip, nodes: [edge-a]}
snapshots:
  web: {image: tiny, source: web.zip}
instances:
  web-1: {snapshot: web, node: edge-a}
  web-2: {snapshot: web, node: edge-a}
"""


def setup(tmp: Path) -> Path:
    (tmp / "tiny.zip").write_bytes(b"image")
    (tmp / "web.zip").write_bytes(b"snapshot")
    path = tmp / "cloudlet.yaml"
    path.write_text(MANIFEST)
    return path


def start(path: Path, *extra: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("NEPHELE_STATE_DIR", None)
    return subprocess.Popen(
        [sys.executable, str(SCRIPT), str(path), *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )


def wait_for_start(state: Path, proc: subprocess.Popen[str], timeout: float = 30) -> str:
    """The id of the first instance start the daemon begins."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for e in eventlog.read(state / "events.jsonl"):
            if (
                e["event"] == "action"
                and e["result"] == "start"
                and str(e["action"]).startswith("start_instance")
            ):
                return str(e["action"])
        assert proc.poll() is None, proc.communicate()[0]
        time.sleep(0.05)
    raise AssertionError("the daemon never started an instance")


def test_sigterm_finishes_the_running_action_starts_nothing_new_and_exits_0(tmp_path: Path) -> None:
    path = setup(tmp_path)
    state = tmp_path / ".nephele" / "demo"
    proc = start(path)
    try:
        first = wait_for_start(state, proc)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out
    assert "Received SIGTERM" in out
    assert time.monotonic() - t0 < 15
    evs = eventlog.read(state / "events.jsonl")
    actions = [(e["action"], e["result"]) for e in evs if e["event"] == "action"]
    assert (first, "done") in actions  # the running action finished
    other = "start_instance:instance/web-2" if first.endswith("web-1") else "start_instance:instance/web-1"
    assert (other, "start") not in actions  # the queued one never started
    assert (other, "not_run") in actions
    journal = read_events(state / "journal.jsonl")
    assert journal[-1]["event"] == "run_end"
    doc: dict[str, Any] = json.loads((state / "watch.json").read_text())
    assert doc["state"] == "stopped" and not (state / "lock.json").exists()
    assert evs[-1]["event"] == "daemon" and evs[-1]["result"] == "stop"


def test_a_second_signal_exits_at_once_and_a_restart_resumes(tmp_path: Path) -> None:
    path = setup(tmp_path)
    state = tmp_path / ".nephele" / "demo"
    proc = start(path)
    try:
        first = wait_for_start(state, proc)
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0, out
    assert (state / "lock.json").exists()  # left behind by the killed pass
    again = start(path, "--once")
    out, _ = again.communicate(timeout=60)
    assert again.returncode == 0, out
    assert f"killed while running {first}" in out
    evs = eventlog.read(state / "events.jsonl")
    assert any(e["event"] == "resume" and e["action"] == first for e in evs)
    assert any(e["event"] == "daemon" and e["result"] == "lock_broken" for e in evs)
    assert not (state / "lock.json").exists()
