"""Fixtures shared by the memory-channel tests."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from nephele.handoff.memory import mem_ref_id
from tests.handoff.test_memory_synthetic import BLOCKS, make_stream
from tests.handoff.test_switchover_check import apply


@pytest.fixture
def case(tmp_path: Path) -> tuple[bytes, dict[str, Path], dict[str, bytearray]]:
    rng = random.Random(7)
    base = {name: rng.randbytes(n) for name, n in BLOCKS}
    refs: dict[str, Path] = {}
    for i, (name, _n) in enumerate(BLOCKS):
        p = tmp_path / f"base{i}.ram"
        p.write_bytes(base[name])
        refs[mem_ref_id(name)] = p
    stream = make_stream(rng, base, sections=12)
    return stream, refs, apply(stream)
