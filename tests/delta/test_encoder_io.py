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


def test_reference_candidates_in_the_map_and_in_the_partial_last_block(
    tmp_path: Path, rng: np.random.Generator
) -> None:
    """Candidates are confirmed in place in the reference's map, or, for its zero-padded last block, from a
    copy: a true match is sent by reference, a forced hash collision by value, in both places."""
    from nephele.delta import Decoder, Encoder, RefSet
    from nephele.delta import _kernels as K

    ref = rand_blocks(rng, 16)
    refs = {"r": write(tmp_path / "r", ref, size=16 * BLOCK - 100)}
    padded = ref[15].copy()
    padded[-100:] = 0
    new = np.stack([ref[3], padded, *rand_blocks(rng, 2)])
    h = np.empty((4, 2), np.uint64)
    K.hash_blocks(new.view(np.uint64).reshape(4, 512), h)
    rs = RefSet.open(refs)
    true = rs.indexes[0].hashes
    rs.indexes[0].hashes = true.copy()
    rs.indexes[0].hashes[9] = h[2]  # collides in the map
    rs.indexes[0].hashes[14] = h[3]  # collides too (whole block)
    rs.build_table()
    buf = io.BytesIO()
    enc = Encoder(rs, buf, emit_keep=False)
    enc.begin_target("memory", "memory", new.nbytes, None)
    enc.put_blocks("memory", np.arange(4), new)
    st = enc.finish()
    assert enc.collisions == 2
    assert (st.kinds["memory"].by_ref, st.kinds["memory"].by_value) == (2, 2)  # blocks 3 and the padded 15
    out = tmp_path / "out"
    dec = Decoder(refs, {"memory": out})
    dec.feed(buf.getvalue())
    dec.close()
    assert out.read_bytes() == new.tobytes()
    # A collision with the partial last block: confirmed from a copy, sent by value.
    rs.indexes[0].hashes = true.copy()
    rs.indexes[0].hashes[15] = h[2]
    rs.build_table()
    buf = io.BytesIO()
    enc = Encoder(rs, buf, emit_keep=False)
    enc.begin_target("memory", "memory", 2 * BLOCK, None)
    enc.put_blocks("memory", np.arange(2), new[[0, 2]])
    st = enc.finish()
    assert enc.collisions == 1
    assert (st.kinds["memory"].by_ref, st.kinds["memory"].by_value) == (1, 1)
    dec = Decoder(refs, {"memory": tmp_path / "out2"})
    dec.feed(buf.getvalue())
    dec.close()
    assert (tmp_path / "out2").read_bytes() == new[[0, 2]].tobytes()
