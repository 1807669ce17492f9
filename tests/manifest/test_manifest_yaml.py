"""The position-keeping YAML layer: positions of keys and values, duplicate keys, syntax errors, and the
YAML 1.1 surprises the loader avoids."""

from __future__ import annotations

from pathlib import Path

import pytest

import nephele.manifest as manifest
from nephele.errors import ManifestError
from nephele.manifest.yamlpos import Pos, format_path, parse

HEAD = """\
apiVersion: nephele.dev/v1
kind: Cloudlet
metadata: {name: demo}
"""


def messages(text: str) -> list[str]:
    with pytest.raises(ManifestError) as info:
        manifest.loads(text, "m.yaml")
    assert str(info.value) == "\n".join(str(p) for p in info.value.problems)
    return [str(p) for p in info.value.problems]


def test_positions_of_keys_values_and_list_items() -> None:
    data, pos, problems = parse("a:\n  b: [x, 'y']\n  c:\n    - 1\n", "f.yaml")
    assert problems == []
    assert data == {"a": {"b": ["x", "y"], "c": [1]}}
    assert pos.keys[("a", "b")] == Pos(2, 3)
    assert pos.values[("a", "b")] == Pos(2, 6)
    assert pos.values[("a", "b", 1)] == Pos(2, 10)
    assert pos.values[("a", "c", 0)] == Pos(4, 7)
    # an absent path falls back to its nearest ancestor
    assert pos.value(("a", "c", 5, "zz")) == Pos(4, 5)


@pytest.mark.parametrize(
    ("path", "text"),
    [
        ((), ""),
        (("nodes",), "nodes"),
        (("instances", "web-1", "ports", 0), "instances.web-1.ports[0]"),
        (("nodes", "a.b", "x"), 'nodes["a.b"].x'),
        ((0, "a"), "[0].a"),
    ],
)
def test_format_path(path: tuple[str | int, ...], text: str) -> None:
    assert format_path(path) == text


def test_duplicate_keys_are_errors_at_every_level() -> None:
    text = HEAD + (
        "nodes:\n"  # 4
        "  edge-a: {address: 10.0.0.1, address: 10.0.0.2}\n"  # 5
        "  edge-a: {address: 10.0.0.3}\n"  # 6
        "kind: Cloudlet\n"  # 7
    )
    assert messages(text) == [
        "m.yaml:5:31: nodes.edge-a: duplicate key 'address' (first at line 5)",
        "m.yaml:6:3: nodes: duplicate key 'edge-a' (first at line 5)",
        "m.yaml:7:1: duplicate key 'kind' (first at line 2)",
    ]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            HEAD + "nodes:\n  edge-a: {address: 10.0.0.1\n  edge-b: {}\n",
            "m.yaml:6:9: YAML syntax error: expected ',' or '}', but got ':' "
            "(while parsing a flow mapping at line 5)",
        ),
        (
            HEAD + "nodes:\n\tedge-a: {}\n",
            "m.yaml:5:1: YAML syntax error: found character '\\t' "
            "that cannot start any token (while scanning for the next token)",
        ),
        (
            HEAD + "nodes:\n  edge-a:\n    address: 'x\n",
            "m.yaml:7:1: YAML syntax error: found unexpected end "
            "of stream (while scanning a quoted scalar at line 6)",
        ),
        (HEAD + "---\nnodes: {}\n", "m.yaml:4:1: a manifest is one YAML document, not several"),
        (
            HEAD + "nodes:\n  edge-a: {address: x}\n edge-b: {address: y}\n",
            "m.yaml:6:2: YAML syntax error: bad indentation: expected <block end>, but found "
            "'<block mapping start>' (while parsing a block mapping at line 1)",
        ),
        ("", "m.yaml:1:1: the manifest is empty"),
        ("a: 1\nb: x\x07y\n", "m.yaml:2:5: YAML syntax error: the character '\\x07' is not allowed"),
        ("# only a comment\n", "m.yaml:1:1: the manifest is empty"),
    ],
)
def test_syntax_errors_are_located(text: str, expected: str) -> None:
    assert messages(text) == [expected]


def test_base60_and_timestamps_stay_strings_like_yaml_1_2() -> None:
    data, _, problems = parse("ports: [8080:80, 22:22]\nwhen: 2024-01-01\nn: 12\nkey: no\nno: 1\n", "f")
    assert problems == []
    # YAML 1.1 would give 484880 and 1342; keys are always the literal text.
    assert data == {"ports": ["8080:80", "22:22"], "when": "2024-01-01", "n": 12, "key": False, "no": 1}


def test_merge_keys_explicit_entries_win() -> None:
    text = "base: &b {x: 1, y: 2}\nmore: &m {z: 0}\nc:\n  <<: [*b, *m]\n  y: 3\n"
    data, pos, problems = parse(text, "f")
    assert problems == []
    assert data["c"] == {"y": 3, "x": 1, "z": 0}
    assert pos.keys[("c", "y")] == Pos(5, 3)
    assert pos.keys[("c", "x")] == Pos(1, 11)  # where the merged value was written


def test_merge_keys_in_a_manifest() -> None:
    text = HEAD + (
        "nodes:\n"
        "  edge-a: &node {address: 10.0.0.1, handoffPort: 9000}\n"
        "  edge-b: {<<: *node, address: 10.0.0.2}\n"
    )
    desired = manifest.loads(text)
    assert desired.nodes["edge-b"].address == "10.0.0.2"
    assert desired.nodes["edge-b"].handoff_port == 9000


def test_recursive_alias_is_an_error_not_a_hang() -> None:
    _, _, problems = parse("a: &x [1, *x]\n", "f")
    assert [str(p) for p in problems] == [
        "f:1:4: a[1]: an alias refers to a mapping or list that contains it"
    ]


def test_alias_bomb_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    import nephele.manifest.yamlpos as yamlpos

    monkeypatch.setattr(yamlpos, "MAX_NODES", 1000)
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 6)]
    data, _, problems = parse("\n".join(lines) + "\n", "f")
    assert data is None
    assert [str(p) for p in problems] == [
        "f:3:1: a2: the document expands to more than 1000 values (nested aliases?)"
    ]


def test_tags_other_than_plain_yaml_are_refused() -> None:
    text = HEAD + "nodes: !!set {edge-a}\nimages: !!python/name:os.system x\n"
    assert messages(text) == [
        "m.yaml:4:8: nodes: unsupported YAML tag 'tag:yaml.org,2002:set'",
        "m.yaml:5:9: images: cannot read this value: could not determine a constructor for the tag "
        "'tag:yaml.org,2002:python/name:os.system'",
    ]


def test_complex_keys_are_refused() -> None:
    _, _, problems = parse("? [a, b]\n: 1\n", "f")
    assert [str(p) for p in problems] == ["f:1:3: a mapping key must be a plain name, not a list or mapping"]


def test_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ManifestError) as info:
        manifest.load(tmp_path / "missing.yaml")
    assert str(info.value) == f"{tmp_path}/missing.yaml:1:1: cannot read the file: No such file or directory"
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes(b"apiVersion: x\nkind: caf\xe9\n")
    with pytest.raises(ManifestError) as info:
        manifest.load(bad)
    assert str(info.value) == f"{bad}:2:10: the file is not UTF-8 text"


def test_bom_and_crlf_do_not_shift_positions(tmp_path: Path) -> None:
    path = tmp_path / "m.yaml"
    path.write_bytes(b"\xef\xbb\xbfapiVersion: v0\r\nkind: Cloudlet\r\n")
    with pytest.raises(ManifestError) as info:
        manifest.load(path)
    assert [str(p) for p in info.value.problems] == [
        f"{path}:1:1: missing required field 'metadata'",
        f"{path}:1:1: missing required field 'nodes'",
        f"{path}:1:13: apiVersion: 'v0' is not supported (expected 'nephele.dev/v1')",
    ]
