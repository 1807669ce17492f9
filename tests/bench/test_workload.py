"""bench/workload.py at small scale: byte-identical output for the same seed, and a truth file that matches
the bytes (checked by an independent brute-force classifier over the written images)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_workload", ROOT / "bench" / "workload.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_workload"] = mod
    spec.loader.exec_module(mod)
    return mod


wl = _load()
DISK, MEM = 16, 8  # MiB


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    out = tmp_path_factory.mktemp("wl")
    return out, wl.generate(out, DISK, MEM, seed=7)


def _blocks(path: Path) -> np.ndarray[Any, np.dtype[np.uint8]]:
    return np.fromfile(path, dtype=np.uint8).reshape(-1, wl.BLOCK)


def test_same_seed_gives_identical_bytes_other_seed_does_not(
    made: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    out, summary = made
    again = wl.generate(tmp_path / "a", DISK, MEM, seed=7)
    other = wl.generate(tmp_path / "b", DISK, MEM, seed=8)
    for name, fname in wl.FILES.items():
        assert (out / fname).read_bytes() == (tmp_path / "a" / fname).read_bytes(), name
        assert summary["files"][name]["xxh3_128"] == again["files"][name]["xxh3_128"]
        assert summary["files"][name]["xxh3_128"] != other["files"][name]["xxh3_128"], name
    t1, t2 = wl.load_truth(out), wl.load_truth(tmp_path / "a")
    assert t1.keys() == t2.keys()
    for k in t1:
        assert np.array_equal(t1[k], t2[k]), k
    assert summary["files"]["D0"]["xxh3_128"] == wl.file_hash(out / "D0.img")


def test_truth_matches_bytes(made: tuple[Path, dict[str, Any]]) -> None:
    """Classify every block of D1 then M1 from the bytes alone, in stream order, and compare."""
    out, _ = made
    img = {code: _blocks(out / f) for code, f in enumerate(wl.FILES.values())}
    first: dict[int, dict[bytes, int]] = {}
    for code in (wl.IMG_D0, wl.IMG_M0):
        first[code] = {}
        for i in range(img[code].shape[0]):
            first[code].setdefault(img[code][i].tobytes(), i)
    stream: dict[bytes, int] = {}
    truth = wl.load_truth(out)
    zero = bytes(wl.BLOCK)
    for name, tgt, base, other in (
        ("disk", wl.IMG_D1, wl.IMG_D0, wl.IMG_M0),
        ("memory", wl.IMG_M1, wl.IMG_M0, wl.IMG_D0),
    ):
        cls, kind, src = truth[f"{name}_class"], truth[f"{name}_kind"], truth[f"{name}_src"]
        assert cls.shape == (img[tgt].shape[0],)
        for i in range(img[tgt].shape[0]):
            b = img[tgt][i].tobytes()
            if b == img[base][i].tobytes():
                want = (wl.C_UNCHANGED, -1)
            elif b == zero:
                want = (wl.C_ZERO, -1)
            elif b in first[base]:
                want = (wl.C_DUP, base << 40 | first[base][b])
            elif b in first[other]:
                want = (wl.C_DUP, other << 40 | first[other][b])
            elif b in stream:
                want = (wl.C_DUP, stream[b])
            else:
                want = (wl.C_NEW, -1)
                stream[b] = tgt << 40 | i
            assert (int(cls[i]), int(src[i])) == want, (name, i)
        # Detailed kinds agree with classes, and edits really are small edits of the base block.
        assert np.array_equal(
            cls == wl.C_DUP, np.isin(kind, (wl.K_DUP_SAME, wl.K_DUP_OTHER, wl.K_DUP_STREAM))
        )
        assert np.array_equal(cls == wl.C_NEW, kind >= wl.K_NEW_EDIT)
        edits = np.flatnonzero(kind == wl.K_NEW_EDIT)
        changed = (img[tgt][edits].view(np.uint64) != img[base][edits].view(np.uint64)).sum(axis=1)
        assert edits.size and changed.min() >= 1 and changed.max() <= 21
        same = kind == wl.K_DUP_SAME
        assert np.all(src[same] >> 40 == base)
        text = img[tgt][kind == wl.K_NEW_TEXT][:, :-8]
        assert text.size and np.all((text >= 32) | (text == 10))


def test_shape_like_the_measured_handoff(made: tuple[Path, dict[str, Any]]) -> None:
    """About half of the dirtied memory is zero, a fifth dup, the rest new; every class and kind occurs."""
    _, summary = made
    mem = summary["truth"]["memory"]["blocks"]
    dirty = mem["zero"] + mem["dup"] + mem["new"]
    assert 0.45 < mem["zero"] / dirty < 0.58
    assert 0.15 < mem["dup"] / dirty < 0.26
    for name in ("disk", "memory"):
        kinds = summary["truth"][name]["kind_mib"]
        assert all(v > 0 for v in kinds.values()), (name, kinds)
    disk = summary["truth"]["disk"]["blocks"]
    assert disk["unchanged"] > 0.9 * sum(disk.values())


def test_cache_check_and_bad_arguments(made: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    out, _ = made
    assert wl.is_current(out, wl.params_of(DISK, MEM, 7, 1.0))
    assert not wl.is_current(out, wl.params_of(DISK, MEM, 8, 1.0))
    with pytest.raises(wl.WorkloadError, match=r"--scale 3\.0"):
        wl.generate(tmp_path / "big", 4, 4, scale=3.0)
    assert not (tmp_path / "big" / wl.SUMMARY).exists()
    assert not list((tmp_path / "big").glob("*.img*"))
    with pytest.raises(wl.WorkloadError, match="at least 1 MiB"):
        wl.generate(tmp_path / "x", 0, 4)


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert wl.main(["--out", str(tmp_path), "--disk-mib", "4", "--mem-mib", "2", "--seed", "1"]) == 0
    assert "memory  MiB:" in capsys.readouterr().out
    assert wl.main(["--out", str(tmp_path / "no"), "--disk-mib", "4", "--mem-mib", "2", "--scale", "9"]) == 2
