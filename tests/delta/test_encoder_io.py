"""encode_files reads images in place through read-only maps: a file that changes size under it is a
clear error (never a SIGBUS), and the maps leave no pages behind."""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from nephele.delta import Target, decode_files, encode_files, encoder
from nephele.errors import DeltaError
from tests.delta.conftest import rand_blocks, write

BLOCK = 4096


@pytest.mark.parametrize(("change", "message"), [(-3 * BLOCK, "shrank"), (BLOCK, "changed size")])
def test_target_changing_size_while_encoded(
    tmp_path: Path, rng: np.random.Generator, monkeypatch: pytest.MonkeyPatch, change: int, message: str
) -> None:
    base = rand_blocks(rng, 40)
    refs = {"b": write(tmp_path / "b", base)}
    new = write(tmp_path / "n", rand_blocks(rng, 40))
    monkeypatch.setattr(encoder, "CHUNK_BLOCKS", 8)
    real = encoder.Encoder._put
    calls = []

    def put(self: encoder.Encoder, *a: Any) -> None:
        real(self, *a)
        calls.append(1)
        if len(calls) == 1:
            os.truncate(new, new.stat().st_size + change)

    monkeypatch.setattr(encoder.Encoder, "_put", put)
    with pytest.raises(DeltaError, match=message):
        encode_files(refs, [Target("disk", "disk", new, "b")], io.BytesIO())


def test_round_trip_with_a_partial_last_block_in_every_chunk_layout(
    tmp_path: Path, rng: np.random.Generator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Images read through the map, except the chunk with the partial last block (read into a buffer),
    with SHA-256 over both; bases shorter and longer than the target."""
    base = rand_blocks(rng, 30)
    for chunk, size, base_size in [
        (4, 30 * BLOCK - 5, 25 * BLOCK + 7),
        (7, 9 * BLOCK + 1, 30 * BLOCK),
        (64, 100, 0),
    ]:
        monkeypatch.setattr(encoder, "CHUNK_BLOCKS", chunk)
        new = base.copy()
        new[::3] = rand_blocks(rng, 10)
        new[1::5] = 0
        refs = {"b": write(tmp_path / "b", base, size=base_size)}
        nd = write(tmp_path / "n", new, size=size)
        buf = io.BytesIO()
        encode_files(refs, [Target("disk", "disk", nd, "b")], buf, sha256=True)
        out = tmp_path / "o"
        out.unlink(missing_ok=True)
        decode_files(io.BytesIO(buf.getvalue()), refs, {"disk": out})
        assert out.read_bytes() == nd.read_bytes()
