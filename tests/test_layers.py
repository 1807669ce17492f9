"""The layer contract (DESIGN.md §3) holds for the whole source tree, and the checker can fail."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _checker():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("check_layers", ROOT / "tools" / "check_layers.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    sys.modules["check_layers"] = mod
    spec.loader.exec_module(mod)
    return mod


def test_source_tree_respects_layers() -> None:
    assert _checker().check(ROOT) == []


def test_checker_catches_upward_import_and_libvirt_outside_node(tmp_path: Path) -> None:
    pkg = tmp_path / "nephele"
    (pkg / "delta").mkdir(parents=True)
    (pkg / "reconcile").mkdir()
    (pkg / "delta" / "bad.py").write_text("from nephele.reconcile import plan\nimport libvirt\n")
    (pkg / "reconcile" / "ok.py").write_text("from nephele.delta import bad\nfrom . import ok\n")
    errors = _checker().check(tmp_path)
    assert len(errors) == 2, errors
    assert "nephele.delta must not import nephele.reconcile" in errors[0]
    assert "only nephele.node may" in errors[1]
