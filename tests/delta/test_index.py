"""RefReader: random access to reference blocks, whatever order, repeats, the partial last block."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from nephele.delta.index import GATHER_BATCH, RefReader
from nephele.errors import DeltaError
from tests.delta.conftest import rand_blocks, write

BLOCK = 4096


def test_gather_any_order_with_repeats_and_tail(tmp_path: Path, rng: np.random.Generator) -> None:
    img = rand_blocks(rng, 3 * GATHER_BATCH + 5)
    size = img.nbytes - 1000
    p = write(tmp_path / "img", img, size=size)
    expect = img.copy()
    expect[-1, BLOCK - 1000 :] = 0  # the last block is zero-padded
    r = RefReader(p, size)
    for blocks in (
        np.arange(img.shape[0]),
        rng.integers(0, img.shape[0], 5 * GATHER_BATCH),
        np.array([img.shape[0] - 1, 0, img.shape[0] - 1, 7]),
        np.array([], np.int64),
    ):
        assert np.array_equal(r.gather(blocks), expect[blocks])
    out = np.empty((4, BLOCK), np.uint8)
    r.read_range(img.shape[0] - 2, out)  # two real blocks, then beyond the end: zeros
    assert np.array_equal(out[:2], expect[-2:]) and not out[2:].any()
    r.close()


def test_gather_refuses_a_shrunken_reference(tmp_path: Path, rng: np.random.Generator) -> None:
    p = write(tmp_path / "img", rand_blocks(rng, 8))
    r = RefReader(p, 8 * BLOCK)
    with open(p, "r+b") as f:
        f.truncate(3 * BLOCK)
    with pytest.raises(DeltaError, match="shrank"):
        r.gather(np.array([6]))
    r.close()
