"""`nephele plan` through nephele.cli.main.main: output, exit codes, plan files, bad input."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path
from typing import Any

import pytest
from plandata import MANIFEST, observed_dict

from nephele.cli.main import main
from nephele.reconcile import planfile

ROOT = Path(__file__).resolve().parent.parent.parent


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    m = tmp_path / "cloudlet.yaml"
    m.write_text(MANIFEST)
    o = tmp_path / "observed.json"
    o.write_text(json.dumps(observed_dict()))
    same = observed_dict()  # everything already in place: no changes
    web1 = same["nodes"]["edge-a"]["instances"].pop("web-1")
    same["nodes"]["edge-b"] = {**same["nodes"]["edge-b"], "instances": {"web-1": web1}}
    same["nodes"]["edge-a"]["instances"]["web-2"] = {**web1, "uuid": "u2", "ports": ["9090:80"]}
    n = tmp_path / "same.json"
    n.write_text(json.dumps(same))
    return {"manifest": m, "observed": o, "same": n, "dir": tmp_path}


def run(capsys: pytest.CaptureFixture[str], *argv: Any) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_changes_exit_0_or_2_with_detailed_exitcode(files: dict[str, Path], capsys: Any) -> None:
    base = ["plan", "-f", files["manifest"], "--observed", files["observed"]]
    code, out, _ = run(capsys, *base)
    assert code == 0
    assert "» instance/web-1  edge-a → edge-b" in out
    assert run(capsys, *base, "--detailed-exitcode")[0] == 2


def test_no_changes_exit_0_with_detailed_exitcode(files: dict[str, Path], capsys: Any) -> None:
    code, out, _ = run(
        capsys, "plan", "-f", files["manifest"], "--observed", files["same"], "--detailed-exitcode"
    )
    assert code == 0
    assert out == "No changes. The cloudlet matches the manifest.\n"


def test_json_output_parses(files: dict[str, Path], capsys: Any) -> None:
    code, out, _ = run(capsys, "plan", "-f", files["manifest"], "--observed", files["observed"], "-o", "json")
    assert code == 0
    doc = json.loads(out)
    assert doc["format_version"] == "1"
    assert [a["id"] for a in doc["actions"]] == ["handoff:instance/web-1", "start_instance:instance/web-2"]
    assert doc["meta"]["manifest_sha256"] == planfile.manifest_hash(files["manifest"].read_bytes())


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "the observed state is not valid JSON"),
        ('{"format": "nephele.observed/v9", "nodes": {}}', "unsupported observed-state format"),
        ('{"nodes": {"edge-a": {"instances": {"x": {"uuid": "u"}}}}}', "missing field 'snapshot'"),
        ("[1, 2]", "expected a JSON object"),
    ],
)
def test_bad_observed_file_names_the_file(
    files: dict[str, Path], capsys: Any, content: str, message: str
) -> None:
    bad = files["dir"] / "bad.json"
    bad.write_text(content)
    code, out, err = run(capsys, "plan", "-f", files["manifest"], "--observed", bad)
    assert code == 1 and out == ""
    assert err.startswith(f"error: {bad}: ") and message in err


def test_missing_files_are_clear_errors(files: dict[str, Path], capsys: Any) -> None:
    code, _, err = run(capsys, "plan", "-f", files["dir"] / "nope.yaml", "--observed", files["observed"])
    assert code == 1 and "nope.yaml:1:1: cannot read the file" in err
    code, _, err = run(capsys, "plan", "-f", files["manifest"], "--observed", files["dir"] / "nope.json")
    assert code == 1 and "nope.json: cannot read the observed state" in err


def test_invalid_manifest_reports_its_problems(files: dict[str, Path], capsys: Any) -> None:
    files["manifest"].write_text(MANIFEST.replace("node: edge-b", "node: edge-z"))
    code, out, err = run(capsys, "plan", "-f", files["manifest"], "--observed", files["observed"])
    assert code == 1 and out == ""
    assert "cloudlet.yaml:12:" in err and "edge-z" in err


def test_plan_with_errors_exits_1_and_saves_nothing(files: dict[str, Path], capsys: Any) -> None:
    obs = observed_dict()
    obs["nodes"]["edge-a"]["instances"]["intruder"] = {
        "uuid": "x",
        "snapshot": "web",
        "state": "running",
        "ports": ["9090:80"],
    }
    files["observed"].write_text(json.dumps(obs))
    out_file = files["dir"] / "plan.json"
    code, out, _ = run(
        capsys, "plan", "-f", files["manifest"], "--observed", files["observed"], "-out", out_file
    )
    assert code == 1
    assert "held by instance/intruder" in out
    assert not out_file.exists()


def test_transfer_budget_error_and_override(files: dict[str, Path], capsys: Any) -> None:
    files["manifest"].write_text(MANIFEST.replace("policy: {prune: true}", "policy: {transferBudget: 1MiB}"))
    base = ["plan", "-f", files["manifest"], "--observed", files["observed"]]
    code, out, _ = run(capsys, *base)
    assert code == 1 and "over the transfer budget of 1 MiB" in out
    code, out, _ = run(capsys, *base, "--ignore-transfer-budget", "--detailed-exitcode")
    assert code == 2 and "planned anyway" in out


def test_target_filters_and_bad_target_fails(files: dict[str, Path], capsys: Any) -> None:
    base = ["plan", "-f", files["manifest"], "--observed", files["observed"], "-o", "json"]
    code, out, _ = run(capsys, *base, "--target", "instance/web-2")
    assert code == 0
    assert [a["id"] for a in json.loads(out)["actions"]] == ["start_instance:instance/web-2"]
    code, out, err = run(capsys, *base, "--target", "instance/nope")
    assert code == 1 and out == "" and "--target instance/nope: no instance named 'nope'" in err
    code, _, err = run(capsys, *base, "--target", "web-2")
    assert code == 1 and "expected KIND/NAME" in err


def test_out_saves_a_loadable_plan_with_the_manifest_hash(files: dict[str, Path], capsys: Any) -> None:
    out_file = files["dir"] / "plan.json"
    code, out, _ = run(
        capsys, "plan", "-f", files["manifest"], "--observed", files["observed"], "-out", out_file
    )
    assert code == 0 and f"Saved the plan to {out_file}" in out
    saved = planfile.load(out_file)
    assert saved.manifest_sha256 == planfile.manifest_hash(files["manifest"].read_bytes())
    assert [a.id for a in saved.plan.actions] == ["handoff:instance/web-1", "start_instance:instance/web-2"]
    assert [p.name for p in files["dir"].iterdir() if p.name.startswith(".plan.json")] == []


def test_inventory_enables_prune(files: dict[str, Path], capsys: Any) -> None:
    obs = observed_dict()
    obs["nodes"]["edge-a"]["instances"]["old"] = {
        "uuid": "o",
        "snapshot": "web",
        "state": "running",
        "manifest": "demo",
    }
    files["observed"].write_text(json.dumps(obs))
    inv = files["dir"] / "inventory.json"
    inv.write_text(
        json.dumps({"manifest": "demo", "entries": [{"kind": "instance", "name": "old", "node": "edge-a"}]})
    )
    base = ["plan", "-f", files["manifest"], "--observed", files["observed"]]
    assert "not pruned (it is not in nephele's inventory)" in run(capsys, *base)[1]
    code, out, _ = run(capsys, *base, "--inventory", inv)
    assert code == 0 and "- instance/old" in out and "1 to prune" in out
    inv.write_text("[]")
    code, _, err = run(capsys, *base, "--inventory", inv)
    assert code == 1 and "not a nephele inventory" in err


def test_example_files_plan_with_changes(capsys: Any) -> None:
    """examples/observed.json is a recorded state for examples/cloudlet.yaml that needs changes."""
    m, o = ROOT / "examples" / "cloudlet.yaml", ROOT / "examples" / "observed.json"
    code, out, _ = run(capsys, "plan", "-f", m, "--observed", o, "--detailed-exitcode")
    assert code == 2
    assert "+ instance/web-1" in out


def test_manifest_from_stdin(files: dict[str, Path], capsys: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(MANIFEST.encode())))
    code, out, _ = run(capsys, "plan", "-f", "-", "--observed", files["observed"], "-o", "json")
    assert code == 0
    assert json.loads(out)["meta"]["manifest_path"] == "-"
