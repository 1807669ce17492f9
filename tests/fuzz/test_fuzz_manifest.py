"""Fuzz the manifest loader: mutated YAML (text and raw bytes, mostly mutations of
examples/cloudlet.yaml) gives a Desired or a ManifestError whose every problem points inside the text;
never another exception, never a hang, and loading writes nothing."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

import nephele.manifest as manifest
from nephele.errors import ManifestError
from tests.fuzz.budget import fuzz, no_hang

EXAMPLE = (Path(__file__).resolve().parents[2] / "examples" / "cloudlet.yaml").read_text()

# Pieces that mean something to YAML (anchors, aliases, merges, tags, flow and block syntax, directives,
# document markers) or to the schema (names, ports, sizes, durations), and characters YAML refuses.
TOKENS = [
    *" \t\n\r:-[]{},'\"#&*!|>%@`?~",
    "&a ",
    "*a",
    "<<: *a",
    "!!python/object:os.system ",
    "!!binary ",
    "!!int ",
    "!!map ",
    "!custom ",
    "? ",
    "- ",
    "---\n",
    "...\n",
    "%YAML 1.1\n",
    "%TAG ! tag:x,2000:\n",
    "{a: 1, a: 2}",
    "[*a, *a]",
    "edge-c",
    "8080:80",
    "99999:80",
    "1.5GiB",
    "5s",
    "-1",
    "null",
    "~",
    "yes",
    "no",
    "0x1F",
    "1e999",
    ".nan",
    "2001-12-14t21:59:43.10-05:00",
    "\x00",
    "\x07",
    "\ufeff",
    "\u2028",
    "\U0001f600",
    "é",
    "\\",
    "x" * 300,
]


@st.composite
def mutated_text(draw: st.DrawFn) -> str:
    """The example (or a random token soup) with 1 to 6 edits: insert, delete, replace, duplicate a span
    (splice), move a line, re-indent a line."""
    text = (
        EXAMPLE if draw(st.integers(0, 9)) else "".join(draw(st.lists(st.sampled_from(TOKENS), max_size=40)))
    )
    for _ in range(draw(st.integers(1, 6))):
        n = len(text)
        i = draw(st.integers(0, n))
        j = draw(st.integers(i, min(n, i + 80)))
        op = draw(st.sampled_from(["insert", "delete", "replace", "splice", "line", "indent"]))
        if op == "insert":
            text = text[:i] + draw(st.sampled_from(TOKENS)) + text[i:]
        elif op == "delete":
            text = text[:i] + text[j:]
        elif op == "replace":
            text = text[:i] + draw(st.text(max_size=12)) + text[j:]
        elif op == "splice":
            k = draw(st.integers(0, n))
            text = text[:k] + text[i:j] + text[k:]
        else:
            lines = text.splitlines(keepends=True)
            if not lines:
                continue
            a = draw(st.integers(0, len(lines) - 1))
            if op == "line":
                b = draw(st.integers(0, len(lines) - 1))
                lines.insert(b, lines.pop(a))
            else:
                lines[a] = draw(st.sampled_from(["", " ", "  ", "    ", "\t"])) + lines[a].lstrip(" ")
            text = "".join(lines)
    return text[:20_000]  # bounded: the loader's cost is linear, a larger input tests nothing new


def check_problems(text: str, exc: ManifestError, filename: str) -> None:
    assert exc.problems, "a ManifestError without problems"
    assert str(exc), "a ManifestError without a message"
    # YAML counts lines as PyYAML does: \n, \r\n, \r, and the Unicode breaks \x85 \u2028 \u2029.
    lines = text.replace("\r\n", "\n").replace("\r", "\n")
    for brk in ("\x85", "\u2028", "\u2029"):
        lines = lines.replace(brk, "\n")
    rows = lines.split("\n")
    for p in exc.problems:
        assert p.file == filename, p
        assert p.message, p
        assert 1 <= p.line <= len(rows), (p, len(rows))
        assert 1 <= p.col <= len(rows[p.line - 1]) + 1, (p, rows[p.line - 1])


@fuzz(250)
@given(mutated_text())
def test_loads_mutated_text(text: str) -> None:
    try:
        with no_hang():
            manifest.loads(text, "cloudlet.yaml")
    except ManifestError as exc:
        check_problems(text, exc, "cloudlet.yaml")


@st.composite
def mutated_bytes(draw: st.DrawFn) -> bytes:
    """Raw file bytes: the example's UTF-8 (or a mutation of it) with bit flips, byte inserts, a
    truncation, a BOM or a UTF-16 re-encoding."""
    data = bytearray(draw(mutated_text()).encode("utf-8", "surrogatepass"))
    for _ in range(draw(st.integers(0, 4))):
        op = draw(st.sampled_from(["flip", "insert", "truncate", "bom", "utf16"]))
        i = draw(st.integers(0, len(data)))
        if op == "flip" and data:
            i = min(i, len(data) - 1)
            data[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "insert":
            data[i:i] = draw(st.binary(min_size=1, max_size=8))
        elif op == "truncate":
            del data[i:]
        elif op == "bom":
            data[0:0] = b"\xef\xbb\xbf"
        elif op == "utf16":
            data = bytearray(bytes(data).decode("utf-8", "replace").encode("utf-16"))
    return bytes(data)


@fuzz(150)
@given(mutated_bytes())
def test_load_mutated_file(data: bytes) -> None:
    with tempfile.TemporaryDirectory(prefix="nephele-fuzz-") as d:
        path = Path(d) / "cloudlet.yaml"
        path.write_bytes(data)
        before = os.stat(d).st_mtime_ns
        try:
            with no_hang():
                manifest.load(path)
        except ManifestError as exc:
            assert exc.problems and str(exc)
            for p in exc.problems:
                assert p.file == str(path) and p.message and p.line >= 1 and p.col >= 1, p
            text = data.decode("utf-8-sig", "strict") if _utf8(data) else None
            if text is not None:
                check_problems(text, exc, str(path))
        # Loading reads; it writes nothing beside the file.
        assert [p.name for p in Path(d).iterdir()] == ["cloudlet.yaml"]
        assert os.stat(d).st_mtime_ns == before


def _utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8-sig")
    except UnicodeDecodeError:
        return False
    return True


def test_nested_aliases_are_bounded() -> None:
    """A "billion laughs" document is refused by size, quickly, not expanded."""
    doc = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    for i in range(1, 9):
        refs = ", ".join([f"*a{i - 1}"] * 10)
        doc.append(f"a{i}: &a{i} [{refs}]")
    doc.append("nodes: *a8")
    text = "\n".join(doc) + "\n"
    try:
        with no_hang(10):
            manifest.loads(text, "bomb.yaml")
    except ManifestError as exc:
        assert any("expands to more than" in p.message for p in exc.problems), exc
    else:
        raise AssertionError("a document of 10^9 values was accepted")


def test_null_document_has_a_located_problem() -> None:
    """Found by `make fuzz`: a manifest that is only `~` (YAML null) raised a ManifestError with no
    problem and an empty message."""
    for text in ("~", "null\n", "  ~\n# nothing else\n", "---", "--- ~"):
        try:
            manifest.loads(text, "m.yaml")
        except ManifestError as exc:
            assert [p.message for p in exc.problems] == ["the manifest is null, not a mapping"]
            check_problems(text, exc, "m.yaml")
        else:
            raise AssertionError(f"{text!r} was accepted")
