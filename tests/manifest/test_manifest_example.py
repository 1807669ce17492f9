"""The shipped example and schema: the example validates into the expected Desired, the schema is a
valid 2020-12 schema, and the package and the repo's schemas/ directory hold one and the same file."""

from __future__ import annotations

import json
from pathlib import Path

from jsonschema import Draft202012Validator

import nephele.manifest as manifest
from nephele.model import InstanceState, PortMap

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "cloudlet.yaml"


def test_example_validates_into_desired() -> None:
    desired = manifest.load(EXAMPLE)
    assert desired.name == "demo"
    assert desired.source == str(EXAMPLE)
    assert list(desired.nodes) == ["edge-a", "edge-b"]
    assert desired.nodes["edge-a"].address == "10.201.0.1"
    assert desired.nodes["edge-b"].address == "10.201.0.2"
    assert desired.nodes["edge-a"].handoff_port == 8022
    assert desired.images["tiny"].nodes == ("edge-a", "edge-b")
    assert desired.snapshots["web"].image == "tiny"
    web = desired.instances["web-1"]
    assert (web.snapshot, web.node, web.ports, web.state) == (
        "web",
        "edge-a",
        (PortMap(8080, 80),),
        InstanceState.RUNNING,
    )
    assert desired.policy.prune is False
    assert desired.policy.max_parallel_handoffs == 1
    assert desired.policy.downtime_budget_s == 5.0


def test_schema_is_valid_2020_12_and_validates_the_example() -> None:
    schema = manifest.schema_document()
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    Draft202012Validator.check_schema(schema)


def test_one_schema_file_for_repo_and_package() -> None:
    repo_copy = ROOT / "schemas" / "cloudlet.schema.json"
    assert repo_copy.is_symlink(), "schemas/cloudlet.schema.json must link to the packaged schema"
    assert repo_copy.resolve() == (ROOT / "nephele" / "schemas" / "cloudlet.schema.json").resolve()
    assert json.loads(repo_copy.read_text()) == manifest.schema_document()
