"""Whatever the bytes, the loader answers with a Desired or a ManifestError whose problems point inside
the text: never another exception, never a position that does not exist."""

from __future__ import annotations

from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import nephele.manifest as manifest
from nephele.errors import ManifestError

EXAMPLE = (Path(__file__).resolve().parents[2] / "examples" / "cloudlet.yaml").read_text()
LINES = EXAMPLE.splitlines(keepends=True)
# Characters that matter to YAML, plus a few that matter to the schema.
ALPHABET = st.sampled_from([*" \t\n:-[]{},'\"#&*!|>%@`?~0123456789abcxyz", "edge-c", "8080", "null"])


@st.composite
def mutated(draw: st.DrawFn) -> str:
    lines = list(LINES)
    for _ in range(draw(st.integers(1, 4))):
        i = draw(st.integers(0, len(lines) - 1))
        op = draw(st.sampled_from(["delete", "duplicate", "insert", "swap"]))
        if op == "delete":
            del lines[i]
        elif op == "duplicate":
            lines.insert(i, lines[i])
        elif op == "swap":
            j = draw(st.integers(0, len(lines) - 1))
            lines[i], lines[j] = lines[j], lines[i]
        else:
            col = draw(st.integers(0, len(lines[i])))
            lines[i] = lines[i][:col] + draw(ALPHABET) + lines[i][col:]
        if not lines:
            break
    return "".join(lines)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated())
def test_mutations_give_located_problems_or_a_valid_manifest(text: str) -> None:
    try:
        manifest.loads(text, "m.yaml")
    except ManifestError as exc:
        assert exc.problems
        lines = text.split("\n")
        for p in exc.problems:
            assert p.file == "m.yaml"
            assert 1 <= p.line <= len(lines), p
            assert 1 <= p.col <= len(lines[p.line - 1]) + 1, p
