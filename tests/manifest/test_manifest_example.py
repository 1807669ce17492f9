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


def test_plain_import_finds_the_schema(tmp_path: Path) -> None:
    """Outside the editable install (as from a wheel): the package alone carries its schema."""
    import shutil
    import subprocess
    import sys

    shutil.copytree(ROOT / "nephele", tmp_path / "nephele", ignore=shutil.ignore_patterns("__pycache__"))
    code = (
        "import nephele, nephele.manifest as m; "
        f"assert nephele.__file__.startswith({str(tmp_path)!r}), nephele.__file__; "
        f"print(m.load({str(EXAMPLE)!r}).name, m.schema_document()['$id'])"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"},
        cwd=tmp_path,  # not the repo, whose nephele/ would shadow the copy
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert out == "demo https://nephele.dev/schemas/cloudlet.schema.json\n"


def test_package_data_ships_the_schema() -> None:
    import tomllib

    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = pyproject["tool"]["setuptools"]["package-data"]["nephele"]
    shipped = {p for pattern in patterns for p in (ROOT / "nephele").glob(pattern)}
    assert ROOT / "nephele" / "schemas" / "cloudlet.schema.json" in shipped


def test_inlined_schema_judges_like_the_schema() -> None:
    """The validator runs on a copy with $refs inlined (for speed); it must find exactly the same errors."""
    import yaml
    from jsonschema import ValidationError

    from nephele.manifest import schema

    def key(e: ValidationError) -> tuple[str, str, str]:
        return (str(list(e.absolute_path)), str(e.validator), e.message)

    original = Draft202012Validator(manifest.schema_document())
    inlined = schema._validator()
    assert "$ref" not in json.dumps(inlined.schema)
    texts = [
        EXAMPLE.read_text(),
        (Path(__file__).parent / "fixtures" / "broken.yaml").read_text(),
        "nodes: {Bad: {address: 'a b', ssh: {port: 0}}, ok: []}\nimages: {x: {id: 5, nodes: [A, A]}}\n",
    ]
    found = []
    for text in texts:
        data = yaml.safe_load(text)
        want = sorted(key(e) for e in original.iter_errors(data))
        assert sorted(key(e) for e in inlined.iter_errors(data)) == want
        found.append(len(want))
    assert found[0] == 0 and found[1] >= 7 and found[2] >= 8, found
