"""A hand-built workload with every block class survives encode -> decode byte for byte."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from nephele.delta import Target, decode_files, encode_files
from tests.delta.conftest import rand_blocks, write


def test_every_class_round_trips(tmp_path: Path, rng: np.random.Generator) -> None:
    base = rand_blocks(rng, 512)
    base[100:150] = 0
    mem = rand_blocks(rng, 256)
    new = base.copy()
    new[10:20] = 0  # zeros where the base had data
    new[30:40] = mem[5:15]  # duplicates of another reference image
    new[50:60] = base[300:310]  # duplicates of the base at another offset
    new[70:80] = rand_blocks(rng, 10)  # new
    new[90:100] = new[70:80]  # duplicates of new blocks earlier in the stream
    new[400, 5:50] ^= 7  # small edit: XOR
    newm = mem.copy()
    newm[0:5] = new[70:75]  # memory repeats disk blocks sent earlier in the stream
    refs = {"bd": write(tmp_path / "bd", base), "bm": write(tmp_path / "bm", mem)}
    nd = write(tmp_path / "nd", new, size=new.nbytes - 1000)  # not a whole number of blocks
    nm = write(tmp_path / "nm", newm)
    buf = io.BytesIO()
    st = encode_files(refs, [Target("disk", "disk", nd, "bd"), Target("memory", "memory", nm, "bm")], buf)
    out = {"disk": tmp_path / "od", "memory": tmp_path / "om"}
    st2 = decode_files(io.BytesIO(buf.getvalue()), refs, out)
    assert out["disk"].read_bytes() == nd.read_bytes()
    assert out["memory"].read_bytes() == nm.read_bytes()
    d = st.kinds["disk"]
    assert (d.zeros, d.by_ref) == (10, 30)
    assert d.by_value == 12  # 10 new + the edit + the shortened last block
    assert st.kinds["memory"].by_ref == 5
    assert st.to_dict() == {**st2.to_dict(), "seconds": st.seconds, "sync_seconds": 0.0}
    assert 0 < st2.sync_seconds <= st2.seconds  # the fsync part of the decode, timed apart
    assert "DIRTIED" in st.table()
    assert st.wire_bytes == len(buf.getvalue())
    quick = {"disk": tmp_path / "qd", "memory": tmp_path / "qm"}  # without fsync: same bytes
    decode_files(io.BytesIO(buf.getvalue()), refs, quick, durable=False)
    assert quick["disk"].read_bytes() == nd.read_bytes() and quick["memory"].read_bytes() == nm.read_bytes()
