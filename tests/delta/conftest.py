"""Small image builders for the delta engine tests (a few MiB at most)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

BLOCK = 4096


def write(path: Path, blocks: np.ndarray, size: int | None = None) -> Path:
    data = np.ascontiguousarray(blocks, dtype=np.uint8).tobytes()
    path.write_bytes(data if size is None else data[:size])
    return path


def rand_blocks(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.integers(0, 256, size=(n, BLOCK), dtype=np.uint8)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)
