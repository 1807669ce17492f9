"""`nephele validate`: output and exit codes, through the real command line entry point."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from nephele.cli.main import main

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = str(ROOT / "examples" / "cloudlet.yaml")
BROKEN = str(Path(__file__).parent / "fixtures" / "broken.yaml")


def test_clean_manifest_prints_a_summary(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", "-f", EXAMPLE]) == 0
    out, err = capsys.readouterr()
    assert out == f"{EXAMPLE}: valid (2 nodes, 1 image, 1 snapshot, 1 instance)\n"
    assert err == ""


def test_clean_manifest_as_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", "-f", EXAMPLE, "-o", "json"]) == 0
    assert json.loads(capsys.readouterr().out) == []


def test_broken_manifest_lists_every_problem_on_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", "--file", BROKEN, "--brief"]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 12
    assert lines[0] == f"{BROKEN}:9:29: nodes.edge-a.ssh.port: '22' is not an integer (remove the quotes)"
    assert lines[3] == f"{BROKEN}:24:11: instances.web-1.node: 'edge-c' is not a declared node"
    assert lines[-1] == "11 problems found"


def test_problems_show_the_source_line_with_a_caret(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "m.yaml"
    path.write_text(
        "apiVersion: nephele.dev/v1\nkind: Cloudlet\nmetadata: {name: demo}\n"
        "nodes:\n  edge-a: {address: 10.0.0.1}\n"
        "images: {tiny: {}}\nsnapshots: {web: {image: tiny}}\n"
        "instances:\n  web-1:\n    snapshot: web\n"
        "    node:\tedge-c\n"  # line 11; the tab must not shift the caret
    )
    assert main(["validate", "-f", str(path)]) == 1
    assert capsys.readouterr().err == (
        f"{path}:11:11: instances.web-1.node: 'edge-c' is not a declared node\n"
        "  11 |     node: edge-c\n"
        "     |           ^\n"
        "1 problem found\n"
    )


def test_broken_manifest_as_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", "-f", BROKEN, "-o", "json"]) == 1
    problems = json.loads(capsys.readouterr().out)
    assert len(problems) == 11
    assert problems[3] == {
        "file": BROKEN,
        "line": 24,
        "col": 11,
        "path": "instances.web-1.node",
        "message": "'edge-c' is not a declared node",
    }


def test_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = str(tmp_path / "nope.yaml")
    assert main(["validate", "-f", missing]) == 1
    assert capsys.readouterr().err == (
        f"{missing}:1:1: cannot read the file: No such file or directory\n1 problem found\n"
    )


def test_stdin(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO(Path(EXAMPLE).read_text()))
    assert main(["validate", "-f", "-"]) == 0
    assert capsys.readouterr().out.startswith("<stdin>: valid (")


def test_file_is_required(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["validate"])
    assert info.value.code == 2
    assert "-f/--file" in capsys.readouterr().err
