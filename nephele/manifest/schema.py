"""JSON Schema validation of a parsed manifest, with jsonschema's errors rewritten for humans and
located in the YAML source.

Every error becomes one or more Problems pointing at the offending value, or at the key for a missing
(the parent's key) or unknown (the unknown key itself) field.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Iterable, Mapping
from functools import cache
from importlib import resources
from typing import Any

from jsonschema import Draft202012Validator, ValidationError

from nephele.errors import Problem
from nephele.manifest.yamlpos import Path, Positions

SCHEMA_RESOURCE = ("schemas", "cloudlet.schema.json")

_TYPE_PHRASES = {
    "string": "a string",
    "integer": "an integer",
    "number": "a number",
    "boolean": "true or false",
    "object": "a mapping",
    "array": "a list",
    "null": "empty",
}


@cache
def schema() -> dict[str, Any]:
    """The manifest's JSON Schema (shipped inside the package; `schemas/` in the repo links to it)."""
    text = resources.files("nephele").joinpath(*SCHEMA_RESOURCE).read_text(encoding="utf-8")
    loaded: dict[str, Any] = json.loads(text)
    return loaded


@cache
def _validator() -> Draft202012Validator:
    # Local $refs inlined: the same rules, a third less time on large manifests (no reference lookups).
    return Draft202012Validator(_inline(schema(), schema().get("$defs", {})))


def _inline(node: Any, defs: Mapping[str, Any]) -> Any:
    """`{"$ref": "#/$defs/X", ...}` -> X merged with the siblings, recursively (the schema has no cycles)."""
    if isinstance(node, list):
        return [_inline(item, defs) for item in node]
    if not isinstance(node, Mapping):
        return node
    out = {k: _inline(v, defs) for k, v in node.items() if k != "$ref"}
    ref = node.get("$ref")
    if isinstance(ref, str) and ref.startswith("#/$defs/") and ref[len("#/$defs/") :] in defs:
        return {**_inline(defs[ref[len("#/$defs/") :]], defs), **out}
    if ref is not None:
        out["$ref"] = ref
    return out


def check(data: Any, positions: Positions) -> list[Problem]:
    problems: list[Problem] = []
    for error in _validator().iter_errors(data):
        problems.extend(_explain(error, positions))
    return problems


def describe(value: Any) -> str:
    """A value as the user wrote it, for messages: 'abc', 5, true, a mapping."""
    if value is None:
        return "nothing"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return str(value)


def _explain(error: ValidationError, pos: Positions) -> Iterable[Problem]:
    path: Path = tuple(error.absolute_path)
    kind = str(error.validator)
    value = error.instance
    rule: Any = error.validator_value
    sub: Mapping[str, Any] = error.schema if isinstance(error.schema, Mapping) else {}

    if "propertyNames" in error.absolute_schema_path:
        # The key itself is bad; jsonschema reports it at the parent's path with the key as instance.
        message = f"{describe(value)} {_custom(sub, kind)}"
        yield pos.problem(path, message, at=(*path, str(value)), at_key=True)
        return
    if kind == "additionalProperties" and isinstance(value, Mapping):
        known = list(sub.get("properties", {}))
        for extra in value:
            if extra in sub.get("properties", {}):
                continue
            message = f"unknown field '{extra}'"
            close = difflib.get_close_matches(str(extra), known, n=1, cutoff=0.6)
            if close:
                message += f" (did you mean '{close[0]}'?)"
            yield pos.problem(path, message, at=(*path, extra), at_key=True)
        return
    if kind == "required" and isinstance(value, Mapping):
        for name in rule:
            if name not in value:
                yield pos.problem(path, f"missing required field '{name}'", at_key=True)
        return
    if kind == "uniqueItems" and isinstance(value, list):
        seen: list[Any] = []
        for i, item in enumerate(value):
            if item in seen:
                yield pos.problem((*path, i), f"{describe(item)} is listed twice")
            seen.append(item)
        return
    yield pos.problem(path, _message(kind, value, rule, sub))


def _is_number(text: str, *, integer: bool) -> bool:
    """Whether `text` would be the wanted number without its quotes."""
    if integer:
        return text.isascii() and text.isdigit()
    try:
        float(text)
    except ValueError:
        return False
    return True


def _custom(sub: Mapping[str, Any], kind: str) -> str:
    message = sub.get("x-message")
    return str(message) if message else f"does not match the {kind} rule"


def _message(kind: str, value: Any, rule: Any, sub: Mapping[str, Any]) -> str:
    if kind == "type":
        types = [rule] if isinstance(rule, str) else list(rule)
        wanted = " or ".join(_TYPE_PHRASES.get(t, t) for t in types if t != "null")
        if value is None or isinstance(value, Mapping | list) or types[0] in ("object", "array"):
            return f"expected {wanted}, got {describe(value)}"
        hint = ""
        if "string" in types and isinstance(value, int | float):
            hint = " (put it in quotes to make it one)"
        elif (
            isinstance(value, str)
            and {"integer", "number"} & set(types)
            and _is_number(value, integer="number" not in types)
        ):
            hint = " (remove the quotes)"
        return f"{describe(value)} is not {wanted}{hint}"
    if kind == "enum":
        return f"{describe(value)} is not one of {', '.join(str(v) for v in rule)}"
    if kind == "const":
        return f"{describe(value)} is not supported (expected {describe(rule)})"
    if kind == "pattern":
        return f"{describe(value)} {_custom(sub, kind)}"
    if kind == "minimum":
        return f"{describe(value)} is below the minimum {rule}"
    if kind == "maximum":
        return f"{describe(value)} is above the maximum {rule}"
    if kind == "exclusiveMinimum":
        return f"{describe(value)} must be greater than {rule}"
    if kind in ("minLength", "minProperties"):
        return "must not be empty"
    if kind == "minItems":
        return f"must list at least {rule} item{'s' if rule != 1 else ''}"
    return f"{describe(value)}: {kind} {rule!r} failed"
