"""YAML -> plain Python data, remembering where every mapping key and every value starts.

PyYAML's composer already gives each node a start mark; we walk the node graph ourselves (instead of
`yaml.safe_load`) so that nothing is lost: duplicate keys become problems instead of silently keeping the
last one, and every value and key gets a (line, col) keyed by its path in the document.

Scalars follow YAML 1.1 as PyYAML resolves them, with three exceptions that only ever surprise users of a
manifest: mapping keys are always the literal key text (a node named `no` stays "no", not False), and
plain scalars that YAML 1.1 would read as base-60 numbers (`8080:80` -> 484880) or timestamps stay strings,
as in YAML 1.2.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from nephele.errors import Problem

PathPart = str | int
Path = tuple[PathPart, ...]

# A bound on values materialised, so that nested aliases ("billion laughs") cannot exhaust memory.
# A 1,000-instance manifest has about 14,000.
MAX_NODES = 250_000

_INT = "tag:yaml.org,2002:int"
_FLOAT = "tag:yaml.org,2002:float"
_TIMESTAMP = "tag:yaml.org,2002:timestamp"
_MERGE = "tag:yaml.org,2002:merge"
_STR = "tag:yaml.org,2002:str"
_SEQ = "tag:yaml.org,2002:seq"
_MAP = "tag:yaml.org,2002:map"

_FastLoader: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


@dataclass(frozen=True, order=True)
class Pos:
    line: int  # 1-based
    col: int  # 1-based


@dataclass
class Positions:
    """Where each part of a document starts. `keys[p]` is the key of the mapping entry at path p,
    `values[p]` the value at path p (the root document is path ())."""

    filename: str
    keys: dict[Path, Pos] = field(default_factory=dict)
    values: dict[Path, Pos] = field(default_factory=dict)
    # Values the YAML layer could not read (already reported); they stand as None in the data, and
    # later stages should not report them again as "expected a mapping, got nothing".
    unreadable: set[Path] = field(default_factory=set)

    def value(self, path: Path) -> Pos:
        """The position of the value at `path`, or of the nearest ancestor that exists."""
        return self._nearest(self.values, path)

    def key(self, path: Path) -> Pos:
        """The position of the key of the entry at `path` (its value for list items and the root)."""
        if path in self.keys:
            return self.keys[path]
        return self._nearest(self.values, path)

    def _nearest(self, table: dict[Path, Pos], path: Path) -> Pos:
        for i in range(len(path), -1, -1):
            pos = table.get(path[:i]) or self.keys.get(path[:i])
            if pos is not None:
                return pos
        return Pos(1, 1)

    def problem(self, path: Path, message: str, *, at: Path | None = None, at_key: bool = False) -> Problem:
        """A Problem reported under `path`, located at the value (or key) of `at` (default: `path`)."""
        target = path if at is None else at
        pos = self.key(target) if at_key else self.value(target)
        return Problem(self.filename, pos.line, pos.col, format_path(path), message)


def format_path(path: Path) -> str:
    """`instances.web-1.ports[0]`; keys that are not plain names are quoted: `nodes["a.b"]`."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part and all(c.isalnum() or c in "-_" for c in part):
            out += f".{part}" if out else part
        else:
            out += f"[{_quote(part)}]"
    return out


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _mark(node: Node) -> Pos:
    return Pos(node.start_mark.line + 1, node.start_mark.column + 1)


def parse(text: str, filename: str) -> tuple[Any, Positions, list[Problem]]:
    """Parse one YAML document. Returns (data, positions, problems); data is None when the text does not
    parse at all. Problems found while walking (duplicate keys, odd keys) leave the rest usable."""
    positions = Positions(filename)
    try:
        root = _compose(_FastLoader, text)
    except yaml.YAMLError:
        # libyaml's messages and marks vary between builds; the pure-Python parser's are stable, so
        # re-parse with it to report the error (only on the error path, where speed does not matter).
        try:
            root = _compose(yaml.SafeLoader, text)
        except yaml.YAMLError as exc:
            return None, positions, [_syntax_problem(exc, filename, text)]
    if root is None:
        return None, positions, [Problem(filename, 1, 1, "", "the manifest is empty")]
    walker = _Walker(positions)
    try:
        data = walker.convert(root, ())
    except _TooBig as exc:
        message = f"the document expands to more than {MAX_NODES} values (nested aliases?)"
        return None, positions, [positions.problem(exc.path[:1], message, at_key=True)]
    return data, positions, walker.problems


def _compose(loader_cls: Any, text: str) -> Node | None:
    loader = loader_cls(text)
    try:
        node: Node | None = loader.get_single_node()
        return node
    finally:
        loader.dispose()


def _syntax_problem(exc: yaml.YAMLError, filename: str, text: str) -> Problem:
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem_mark is not None:
        mark = exc.problem_mark
        what = exc.problem or "invalid YAML"
        if what.startswith("expected <block end>"):
            what = f"bad indentation: {what}"
        if exc.context == "expected a single document in the stream":
            return Problem(
                filename, mark.line + 1, mark.column + 1, "", "a manifest is one YAML document, not several"
            )
        if exc.context and exc.context_mark is not None and exc.context_mark.line != mark.line:
            what = f"{what} ({exc.context} at line {exc.context_mark.line + 1})"
        elif exc.context:
            what = f"{what} ({exc.context})"
        return Problem(filename, mark.line + 1, mark.column + 1, "", f"YAML syntax error: {what}")
    if isinstance(exc, yaml.reader.ReaderError):
        # e.g. a control character; the reader gives only a character offset
        line, col = _line_col(text, exc.position)
        char = exc.character if isinstance(exc.character, str) else chr(exc.character)
        return Problem(filename, line, col, "", f"YAML syntax error: the character {char!r} is not allowed")
    return Problem(filename, 1, 1, "", f"YAML syntax error: {exc}")


_BREAKS = re.compile("\r\n|[\n\r\x85\u2028\u2029]")


def _line_col(text: str, position: int) -> tuple[int, int]:
    """1-based line and column of a character offset, counting line breaks as YAML (and PyYAML's
    marks) do: CR LF, LF, a lone CR, NEL, LS and PS."""
    line, start = 1, 0
    for m in _BREAKS.finditer(text, 0, position):
        line, start = line + 1, m.end()
    return line, position - start + 1


def end_of(text: str) -> tuple[int, int]:
    """(line, column) just after the last character of `text`."""
    return _line_col(text, len(text))


class _Walker:
    def __init__(self, positions: Positions) -> None:
        self.positions = positions
        self.problems: list[Problem] = []
        # Only scalar construction is delegated to PyYAML; a pure-Python constructor is all that needs.
        self.constructor = yaml.SafeLoader("")
        self.count = 0
        self.active: set[int] = set()  # nodes on the current path, to stop recursive aliases

    def _problem(self, pos: Pos, path: Path, message: str) -> None:
        self.problems.append(Problem(self.positions.filename, pos.line, pos.col, format_path(path), message))

    def convert(self, node: Node, path: Path) -> Any:
        self.positions.values.setdefault(path, _mark(node))
        self.count += 1
        if self.count > MAX_NODES:
            raise _TooBig(path)
        if isinstance(node, ScalarNode):
            return self._scalar(node, path)
        expected = _SEQ if isinstance(node, SequenceNode) else _MAP
        if node.tag != expected:
            self._problem(_mark(node), path, f"unsupported YAML tag '{node.tag}'")
            self.positions.unreadable.add(path)
            return None
        if id(node) in self.active:
            self._problem(_mark(node), path, "an alias refers to a mapping or list that contains it")
            self.positions.unreadable.add(path)
            return None
        self.active.add(id(node))
        try:
            if isinstance(node, SequenceNode):
                return [self.convert(item, (*path, i)) for i, item in enumerate(node.value)]
            if isinstance(node, MappingNode):
                return self._mapping(node, path)
        finally:
            self.active.discard(id(node))
        self._problem(_mark(node), path, f"unsupported YAML node {type(node).__name__}")
        return None

    def _scalar(self, node: ScalarNode, path: Path) -> Any:
        if node.tag == _STR:
            return node.value  # the common case, without the constructor's overhead
        if not node.style and (  # plain scalar (libyaml says '', PyYAML None)
            (node.tag in (_INT, _FLOAT) and ":" in node.value) or node.tag == _TIMESTAMP
        ):
            return node.value
        try:
            return self.constructor.construct_object(node, deep=True)
        except (yaml.YAMLError, ValueError, TypeError, LookupError, AttributeError, ArithmeticError) as exc:
            # PyYAML's constructors do not check explicitly tagged scalars: `!!int ''` is an IndexError,
            # `!!int x` a ValueError, `!!timestamp x` an AttributeError.
            problem = getattr(exc, "problem", None) or f"not a valid {node.tag.rsplit(':', 1)[-1]}"
            self._problem(_mark(node), path, f"cannot read this value: {problem}")
            self.positions.unreadable.add(path)
            return None

    def _mapping(self, node: MappingNode, path: Path) -> dict[str, Any]:
        result: dict[str, Any] = {}
        first_seen: dict[str, Pos] = {}
        for key_node, value_node, merged in self._entries(node, path):
            if not isinstance(key_node, ScalarNode) or key_node.tag == _MERGE:
                message = "a mapping key must be a plain name, not a list or mapping"
                self._problem(_mark(key_node), path, message)
                continue
            key = key_node.value
            key_pos = _mark(key_node)
            child = (*path, key)
            if merged:
                # `<<: *defaults`: explicit keys override merged ones, so merged entries never clash.
                if key in result:
                    continue
            elif key in first_seen:
                first = first_seen[key]
                self._problem(key_pos, path, f"duplicate key '{key}' (first at line {first.line})")
                continue
            else:
                first_seen[key] = key_pos
            self.positions.keys[child] = key_pos
            result[key] = self.convert(value_node, child)
        return result

    def _entries(self, node: MappingNode, path: Path) -> Iterator[tuple[Node, Node, bool]]:
        """Explicit entries first (so they win), then the entries of `<<` merges in YAML's order."""
        merges: list[Node] = []
        for key_node, value_node in node.value:
            if isinstance(key_node, ScalarNode) and key_node.tag == _MERGE:
                merges.append(value_node)
            else:
                yield key_node, value_node, False
        for merge in merges:
            sources = merge.value if isinstance(merge, SequenceNode) else [merge]
            for source in sources:
                if not isinstance(source, MappingNode):
                    self._problem(_mark(source), path, "'<<' merges only mappings")
                    continue
                if id(source) in self.active:
                    self._problem(_mark(source), path, "an alias refers to a mapping that contains it")
                    continue
                self.active.add(id(source))
                try:
                    yield from ((k, v, True) for k, v, _ in self._entries(source, path))
                finally:
                    self.active.discard(id(source))


class _TooBig(Exception):
    def __init__(self, path: Path) -> None:
        self.path = path
        super().__init__("too many nodes")
