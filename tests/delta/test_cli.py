"""`python -m nephele.delta`: encode, info, decode and index from the shell."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from nephele.delta.__main__ import main
from tests.delta.conftest import rand_blocks, write


def test_encode_info_decode(
    tmp_path: Path, rng: np.random.Generator, capsys: pytest.CaptureFixture[str]
) -> None:
    d0 = rand_blocks(rng, 16)
    d1 = d0.copy()
    d1[4] = 0
    d1[7] = rand_blocks(rng, 1)[0]
    write(tmp_path / "d0", d0)
    write(tmp_path / "d1", d1)
    snap = tmp_path / "snap.nphd"
    assert main(["encode", f"--ref=base={tmp_path / 'd0'}", f"--target=disk:disk:{tmp_path / 'd1'}:base",
                 "-o", str(snap), "--sha256"]) == 0  # fmt: skip
    assert "DIRTIED" in capsys.readouterr().out
    assert main(["info", str(snap)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["targets"][0]["name"] == "disk" and info["frames"]["END"] == 1
    assert info["header"]["sha256"] is True and info["bytes"] == snap.stat().st_size
    out = tmp_path / "out"
    assert main(["decode", str(snap), f"--ref=base={tmp_path / 'd0'}", f"--out=disk={out}"]) == 0
    assert out.read_bytes() == d1.tobytes()
    assert main(["index", str(tmp_path / "d0")]) == 0
    assert "16 blocks" in capsys.readouterr().out


def test_errors_are_messages(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "junk").write_bytes(b"not a stream")
    assert main(["decode", str(tmp_path / "junk"), "--out=disk=" + str(tmp_path / "o")]) == 1
    assert "bad magic" in capsys.readouterr().err
    assert main(["encode", "--target=disk:tape:x", "-o", str(tmp_path / "s")]) == 1
    assert "NAME:disk|memory" in capsys.readouterr().err
    assert not (tmp_path / "o").exists() and not (tmp_path / "s").exists()
