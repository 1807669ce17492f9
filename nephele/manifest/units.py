"""Durations ("5s", "500ms", "1m30s") and sizes ("2GiB", "500MB") as the manifest writes them.

The schema's patterns accept exactly what these functions parse; a bare number is seconds or bytes.
Sizes follow the usual convention: kB/KB, MB, GB, TB are powers of 1000, KiB, MiB, GiB, TiB of 1024.
"""

from __future__ import annotations

import re

_DURATION_PART = re.compile(r"([0-9]+(?:\.[0-9]*)?|\.[0-9]+)(ms|s|m|h)")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}

_SIZE = re.compile(r"^([0-9]+(?:\.[0-9]*)?|\.[0-9]+) ?(B|kB|KB|MB|GB|TB|KiB|MiB|GiB|TiB)$")
_SIZE_UNITS = {
    "B": 1,
    "kB": 1000,
    "KB": 1000,
    "MB": 1000**2,
    "GB": 1000**3,
    "TB": 1000**4,
    "KiB": 1024,
    "MiB": 1024**2,
    "GiB": 1024**3,
    "TiB": 1024**4,
}


def parse_duration(value: str | float) -> float:
    """Seconds. Raises ValueError on anything the schema would reject."""
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a duration")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError(f"{value!r} is negative")
        return float(value)
    total = 0.0
    pos = 0
    for match in _DURATION_PART.finditer(value):
        if match.start() != pos:
            break
        total += float(match.group(1)) * _DURATION_UNITS[match.group(2)]
        pos = match.end()
    if pos != len(value) or not value:
        raise ValueError(f"{value!r} is not a duration (e.g. '5s', '500ms', '2m', '1m30s')")
    return total


def parse_size(value: str | int) -> int:
    """Bytes (rounded down). Raises ValueError on anything the schema would reject."""
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a size")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"{value!r} is negative")
        return value
    match = _SIZE.match(value)
    if not match:
        raise ValueError(f"{value!r} is not a size (e.g. '2GiB', '500MB', '64KiB')")
    number, unit = match.groups()
    # Integer arithmetic where possible so that "2GiB" is exact.
    if "." not in number:
        return int(number) * _SIZE_UNITS[unit]
    return int(float(number) * _SIZE_UNITS[unit])
