"""The node store: atomic writes survive crashes, staged objects appear whole or not at all."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nephele.errors import Conflict
from nephele.node import store as st
from nephele.node.store import Store, atomic_write_bytes, atomic_write_json, content_id


def test_atomic_write_replaces_and_leaves_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "d" / "x.json"
    atomic_write_json(target, {"a": 1})
    atomic_write_json(target, {"a": 2})
    assert json.loads(target.read_text()) == {"a": 2}
    assert [p.name for p in target.parent.iterdir()] == ["x.json"]


def test_failed_rename_keeps_old_content(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "x"
    atomic_write_bytes(target, b"old")

    def boom(src: str, dst: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(st.os, "replace", boom)
    with pytest.raises(OSError, match="No space"):
        atomic_write_bytes(target, b"new" * 1000)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["x"]


def test_killed_writer_never_leaves_a_partial_file(tmp_path: Path) -> None:
    """A process SIGKILLed while writing 64 MiB leaves the old file, whole (at most a temp file)."""
    target = tmp_path / "big"
    atomic_write_bytes(target, b"A" * 4096)
    code = (
        "import sys; from pathlib import Path; from nephele.node.store import atomic_write_bytes\n"
        "print('go', flush=True)\n"
        "atomic_write_bytes(Path(sys.argv[1]), b'B' * (64 << 20))\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, str(target)], stdout=subprocess.PIPE)
    assert proc.stdout and proc.stdout.readline() == b"go\n"
    time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    data = target.read_bytes()
    assert data in (b"A" * 4096, b"B" * (64 << 20))


def test_content_id_depends_on_names_and_hashes_only() -> None:
    a = content_id({"disk.raw": "11", "memory.save": "22"})
    assert a == content_id({"memory.save": "22", "disk.raw": "11"})
    assert a != content_id({"disk.raw": "11", "memory.save": "23"})
    assert a != content_id({"disk.img": "11", "memory.save": "22"})
    assert len(a) == 64


def _stage_image(store: Store, payload: bytes) -> tuple[Path, dict[str, object]]:
    with store.staging("t") as stage:
        pass
    stage.mkdir()
    (stage / "disk.raw").write_bytes(payload)
    (stage / "memory.save").write_bytes(b"mem")
    files = st.hash_files(stage, ["disk.raw", "memory.save"])
    meta = {"format": st.IMAGE_FORMAT, "name": "x", "files": files}
    meta["content_id"] = content_id({n: str(h["sha256"]) for n, h in files.items()})
    return stage, meta


def test_commit_image_is_all_or_nothing_and_idempotent(tmp_path: Path) -> None:
    store = Store(tmp_path).ensure()
    stage, meta = _stage_image(store, b"disk")
    rec, created = store.commit_image(stage, meta)
    assert created and rec.path == store.images / str(meta["content_id"])
    assert sorted(p.name for p in rec.path.iterdir()) == ["disk.raw", "memory.save", "meta.json"]
    stage2, meta2 = _stage_image(store, b"disk")
    rec2, created2 = store.commit_image(stage2, meta2)
    assert not created2 and rec2.path == rec.path
    assert [r.content_id for r in store.list_images()] == [meta["content_id"]]


def test_sweep_removes_staging_left_by_a_crash(tmp_path: Path) -> None:
    store = Store(tmp_path).ensure()
    (store.tmp / "build-crashed").mkdir()
    (store.tmp / "build-crashed" / "disk.raw").write_bytes(b"x")
    assert store.sweep_tmp() == ["build-crashed"]
    assert list(store.tmp.iterdir()) == []
    assert store.list_images() == []


def test_remove_image(tmp_path: Path) -> None:
    store = Store(tmp_path).ensure()
    stage, meta = _stage_image(store, b"d")
    rec, _ = store.commit_image(stage, meta)
    store.remove_image(rec)
    assert store.list_images() == [] and not rec.path.exists()
    assert list(store.tmp.iterdir()) == []


def test_lock_without_wait_reports_conflict(tmp_path: Path) -> None:
    store = Store(tmp_path)
    code = (
        "import sys, time; from nephele.node.store import Store\n"
        "with Store(sys.argv[1]).lock('test'):\n"
        "    print('held', flush=True); time.sleep(10)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE)
    try:
        assert proc.stdout and proc.stdout.readline() == b"held\n"
        with (
            pytest.raises(Conflict, match="locked by another nephele operation"),
            store.lock("mine", wait=False),
        ):
            pass
    finally:
        proc.kill()
        proc.wait()
    with store.lock("mine", wait=False):
        pass


def test_lock_is_reentrant_within_one_store(tmp_path: Path) -> None:
    store = Store(tmp_path)
    with store.lock("outer"), store.lock("inner", wait=False):
        pass
    with store.lock("again", wait=False):
        pass
