"""bench/delta_vs_tools.py: per-command RSS is the command's own, targets are judged correctly, and a tiny
end-to-end run measures every tool and checks nephele's decode against the original bytes."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[2]


def _load() -> ModuleType:
    sys.path.insert(0, str(ROOT / "bench"))
    spec = importlib.util.spec_from_file_location(
        "bench_delta_vs_tools", ROOT / "bench" / "delta_vs_tools.py"
    )
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_delta_vs_tools"] = mod
    spec.loader.exec_module(mod)
    return mod


dvt = _load()


def test_rss_is_the_commands_own_not_the_parents() -> None:
    ballast = bytearray(300 << 20)  # make this process big: a plain fork+exec child would inherit its peak
    ballast[::4096] = b"x" * len(ballast[::4096])
    small = dvt.run_proc(["true"])
    hold = "import time; b = bytearray(200 << 20); b[::4096] = b'y' * len(b[::4096]); time.sleep(0.3)"
    big = dvt.run_proc([sys.executable, "-c", hold])
    assert small.returncode == 0 and small.max_rss_kib < 50 * 1024, small
    assert 200 * 1024 < big.anon_kib < 280 * 1024, big
    assert big.returncode == 0 and 200 * 1024 < big.max_rss_kib < 280 * 1024, big
    missing = dvt.run_proc(["/nonexistent/tool"])
    assert missing.returncode == 127 and "cannot run" in missing.stderr
    del ballast


def _run(method: str, secs: float, out: int, role: str = "encode") -> object:
    return dvt.Run(method, role, 3_000_000_000, seconds=secs, output_bytes=out)


def test_targets_are_ratios_against_xdelta3() -> None:
    xd = _run(dvt.TOOL_LABEL["xdelta3"], 80.0, 200_000_000)
    good = [_run("nephele lz4 encode", 1.5, 140_000_000), _run("nephele lz4 decode", 2.0, 0, "decode"), xd]
    ((label, checks),) = dvt.evaluate(good)
    assert label == "nephele lz4"
    got = {c.what: (round(c.value, 3), c.ok) for c in checks}
    assert got["output <= 0.75 x xdelta3's"] == (0.7, True)
    assert got["encode >= 20 x faster than xdelta3"] == (53.333, True)
    assert got["encode >= 1 GB/s of input"] == (2.0, True)
    assert got["decode >= 1 GB/s (page cache, verified)"] == (1.5, True)
    dec = dvt.Run("nephele lz4 decode", "decode", 3_000_000_000, seconds=2.0, fsync_seconds=4.0)
    ((_, checks),) = dvt.evaluate([good[0], dec, xd])
    got = {c.what: (round(c.value, 3), c.ok, c.info_only) for c in checks}
    assert got["decode >= 1 GB/s (page cache, verified)"] == (1.5, True, False)  # judged without the fsync
    assert got["(info) decode, then fsync"] == (0.5, False, True)
    assert " 4.00 " in dvt.render_table([dec])  # the fsync column
    cpu = dvt.Run("nephele lz4 encode", "encode", 3_000_000_000, seconds=1.5, cpu_seconds=2.0, output_bytes=1)
    ((_, checks),) = dvt.evaluate([cpu, xd])
    info = [c for c in checks if c.info_only]
    assert [(c.what, c.value) for c in info] == [("(info) encode, per CPU second", 1.5)]
    bad = [_run("nephele lz4 encode", 5.0, 160_000_000), xd]
    checks = dvt.evaluate(bad)[0][1]
    assert [c.ok for c in checks] == [False, False, False]  # 0.8 x size, 16 x speed, 0.6 GB/s
    table = dvt.render_table([*bad, dvt.Run("zstd -1", "encode", 1, error="zstd: boom")])
    assert "FAILED: zstd: boom" in table and "nephele lz4 encode" in table
    assert "FAIL" in dvt.render_checks(dvt.evaluate(bad))


def test_tiny_end_to_end(tmp_path: Path) -> None:
    report = tmp_path / "r.json"
    tools = "xdelta3,rsync-zstd,zstd-patch,zstd"
    args = [
        "--workdir",
        str(tmp_path),
        "--disk-mib",
        "8",
        "--mem-mib",
        "4",
        "--tools",
        tools,
        "--codecs",
        "lz4",
    ]
    assert dvt.main([*args, "--json", str(report)]) == 0
    r = json.loads(report.read_text())
    runs = {x["method"]: x for x in r["runs"]}
    assert all(x["error"] is None for x in runs.values()), runs
    assert runs["nephele lz4 decode"]["extra"]["identical_to_targets"] is True
    assert runs["nephele lz4 decode"]["fsync_seconds"] > 0
    d1 = 8 << 20
    assert (
        0 < runs[dvt.TOOL_LABEL["rsync-zstd"]]["per_image"]["disk"]["output_bytes"] < d1 // 5
    )  # a real delta
    assert all(x["output_bytes"] > 0 for x in runs.values() if x["role"] == "encode")
    assert r["targets"][0]["nephele"] == "nephele lz4"
    # The second run reuses the cached workload after checking its hashes.
    assert dvt.main([*args, "--tools", "none", "--codecs", ""]) == 0
    assert not list(tmp_path.glob("run-*"))  # scratch space is removed
