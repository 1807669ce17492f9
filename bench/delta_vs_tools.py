#!/usr/bin/env python3
"""nephele's delta engine against what a user would pick instead, on one deterministic workload.

    python bench/delta_vs_tools.py [--workdir DIR] [--disk-mib N --mem-mib N] [--seed S] [--scale X]
                                   [--quick] [--tools LIST] [--codecs LIST] [--repeat N] [--json FILE]
                                   [--strict]

Generates (or reuses, after checking its hashes) the workload of bench/workload.py, then in one run measures
on D1+M1: nephele encode and decode (each in its own process, so its peak RSS is its own; the decoded images
are compared byte for byte with D1/M1), `xdelta3 -e -s` (default and -B 1 GiB source window),
`zstd --patch-from --long=31`, an rsync batch with 4 KiB blocks then `zstd -1` of the batch, and plain
`zstd -1`. Every tool sees only the base of its own image (D0 for D1, M0 for M1); nephele sees both bases,
which is the design. Files are read once (and dirty pages flushed) before each timed run, so every method
starts from a warm page cache. bench/README.md explains every column.

Prints one table (seconds, input MB/s, output bytes, peak memory, implied handoff time at 20 and 100 Mbit/s),
then the issue-3 targets with PASS/FAIL as ratios. Exit status: 1 if a measurement failed (a tool error, or
nephele's decode differing from D1/M1); target misses only fail the run with --strict.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import workload  # bench/ holds scripts, not a package: import the generator by path

ROOT = Path(__file__).resolve().parent.parent
MB = 1e6
RATES_MBIT = (20, 100)
QUICK_DISK_MIB, QUICK_MEM_MIB = 256, 128
TOOLS = ("xdelta3", "xdelta3-B1G", "zstd-patch", "rsync-zstd", "zstd")
# Issue 3 targets.
MAX_SIZE_VS_XDELTA = 0.75
MIN_SPEEDUP_VS_XDELTA = 20.0
MIN_GBPS = 1.0
READ_BUF = 8 << 20


@dataclass
class Proc:
    seconds: float
    cpu_seconds: float
    max_rss_kib: int
    returncode: int
    stdout: str
    stderr: str
    anon_kib: int = 0  # peak RssAnon of the main process, sampled every 10 ms (file-backed pages excluded)


@dataclass
class Run:
    """One method over D1+M1 (its images summed)."""

    method: str
    role: str  # "encode" (a handoff candidate), "decode" or "index"
    input_bytes: int
    seconds: float = 0.0
    cpu_seconds: float = 0.0
    output_bytes: int = 0
    max_rss_kib: int = 0
    anon_kib: int = 0
    fsync_seconds: float = 0.0  # decode: close() after `seconds` (fsync + rename), the disk's part
    per_image: dict[str, dict[str, Any]] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    error: str | None = None

    @property
    def mbps(self) -> float:
        return self.input_bytes / MB / self.seconds if self.seconds > 0 else 0.0

    def transfer_s(self, mbit: int) -> float:
        return self.output_bytes * 8 / (mbit * 1e6)


@dataclass
class Check:
    what: str
    value: float
    limit: float
    higher_is_better: bool
    detail: str
    info_only: bool = False

    @property
    def ok(self) -> bool:
        return self.value >= self.limit if self.higher_is_better else self.value <= self.limit


# ---------------------------------------------------------------------------------------------------------
# Running and measuring.


# Runs every command under this tiny launcher: its max RSS is then the command's own. (A child forked from
# this big Python process would inherit our RSS high-water mark through exec; see getrusage(2), ru_maxrss.)
LAUNCHER = """
import os, sys, time
out, cmd = sys.argv[1], sys.argv[2:]
t = time.perf_counter()
pid = os.fork()
if pid == 0:
    try:
        os.execvp(cmd[0], cmd)
    except OSError as e:
        os.write(2, f"cannot run {cmd[0]}: {e.strerror}\\n".encode())
    os._exit(127)
anon, status = 0, f"/proc/{pid}/status"
while True:
    done, st, ru = os.wait4(pid, os.WNOHANG)
    if done:
        break
    try:
        with open(status) as f:
            for ln in f:
                if ln.startswith("RssAnon:"):
                    anon = max(anon, int(ln.split()[1]))
                    break
    except OSError:
        pass
    time.sleep(0.01)
w = time.perf_counter() - t
with open(out, "w") as f:
    f.write(f"{w} {ru.ru_utime + ru.ru_stime} {ru.ru_maxrss} {os.waitstatus_to_exitcode(st)} {anon}")
"""


def run_proc(cmd: Sequence[str]) -> Proc:
    """Run cmd to completion: wall time, CPU time and max RSS of that command alone."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err, tempfile.TemporaryDirectory() as d:
        res = Path(d) / "rusage"
        launcher = [sys.executable, "-I", "-S", "-c", LAUNCHER, str(res), *cmd]
        rc = subprocess.run(
            launcher, stdout=out, stderr=err, stdin=subprocess.DEVNULL, check=False
        ).returncode
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(errors="replace"), err.read().decode(errors="replace")[-4000:]
        try:
            wall, cpu, rss, code, anon = res.read_text().split()
        except (OSError, ValueError):
            return Proc(0.0, 0.0, 0, rc or 1, stdout, stderr + f"\nlauncher failed (exit {rc})")
        return Proc(float(wall), float(cpu), int(rss), int(code), stdout, stderr, int(anon))


def warm(paths: Sequence[Path]) -> float:
    """Read files once so the timed run starts from the page cache, then flush dirty pages so writeback of
    an earlier run's output does not throttle this one; returns seconds taken."""
    buf = bytearray(READ_BUF)
    view = memoryview(buf)
    t0 = time.perf_counter()
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while f.readinto(view):
                pass
    os.sync()
    return time.perf_counter() - t0


def same_bytes(a: Path, b: Path) -> bool:
    if a.stat().st_size != b.stat().st_size:
        return False
    ba, bb = bytearray(READ_BUF), bytearray(READ_BUF)
    va, vb = memoryview(ba), memoryview(bb)
    with open(a, "rb", buffering=0) as fa, open(b, "rb", buffering=0) as fb:
        while True:
            na = fa.readinto(va)
            nb = fb.readinto(vb)
            if na != nb or va[:na] != vb[:nb]:
                return False
            if not na:
                return True


@dataclass
class Images:
    """The workload files, by the names the engine API uses."""

    dir: Path
    refs: dict[str, Path]  # "D0", "M0"
    targets: dict[str, tuple[Path, str]]  # "disk" -> (D1, "D0"), "memory" -> (M1, "M0")
    summary: dict[str, Any]

    @property
    def target_bytes(self) -> int:
        return sum(p.stat().st_size for p, _ in self.targets.values())

    def all_files(self) -> list[Path]:
        return [*self.refs.values(), *(p for p, _ in self.targets.values())]


def ensure_workload(
    workdir: Path, disk_mib: int, mem_mib: int, seed: int, scale: float
) -> tuple[Images, str]:
    """Reuse a finished, hash-identical workload with these parameters, else generate it."""
    params = workload.params_of(disk_mib, mem_mib, seed, scale)
    d = workdir / f"wl-d{disk_mib}-m{mem_mib}-s{seed}-x{scale:g}"
    how = "generated"
    if workload.is_current(d, params):
        s = workload.read_summary(d)
        assert s is not None
        if all(workload.file_hash(d / f["path"]) == f["xxh3_128"] for f in s["files"].values()):
            how = "reused (hashes checked)"
        else:
            print(f"workload in {d} does not match its summary: regenerating", file=sys.stderr)
    if how == "generated":
        print(f"generating workload in {d} ...", file=sys.stderr)
        workload.generate(d, disk_mib, mem_mib, seed, scale, log=lambda m: print("  " + m, file=sys.stderr))
    s = workload.read_summary(d)
    assert s is not None
    refs = {k: d / v for k, v in s["refs"].items()}
    targets = {k: (d / v["path"], v["base"]) for k, v in s["targets"].items()}
    return Images(d, refs, targets, s), how


# ---------------------------------------------------------------------------------------------------------
# nephele: encode/decode in a child process (this script with --child), so peak RSS is the engine's own.


def _child_op(spec: Mapping[str, Any]) -> Any:
    from nephele.delta import Target, decode_files, encode_files

    refs = {k: Path(v) for k, v in spec["refs"].items()}
    if spec["op"] == "encode":
        targets = [Target(x["name"], x["kind"], Path(x["path"]), x["base"]) for x in spec["targets"]]
        kw = {"codec": spec["codec"]} if spec.get("codec") else {}
        with open(spec["out"], "wb") as f:
            return encode_files(refs, targets, f, **kw)
    with open(spec["inp"], "rb") as f:
        return decode_files(f, refs, {k: Path(v) for k, v in spec["outputs"].items()})


def _timed_decode(spec: Mapping[str, Any], res: dict[str, Any]) -> Any:
    """decode_files in two timed phases: feeding the whole stream (every frame applied, the images in the
    page cache and verified against the END frame), then close() (fsync of every output and its
    directory, and the rename). The second is the disk's cost, so it is reported apart."""
    from nephele.delta import Decoder

    refs = {k: Path(v) for k, v in spec["refs"].items()}
    t, c = time.perf_counter(), _cpu()
    dec = Decoder(refs, {k: Path(v) for k, v in spec["outputs"].items()})
    try:
        with open(spec["inp"], "rb") as f:
            while chunk := f.read(4 << 20):  # as decode_files does
                dec.feed(chunk)
        res["seconds"], res["cpu_seconds"] = time.perf_counter() - t, _cpu() - c
        t, c = time.perf_counter(), _cpu()
        stats = dec.close()
        res["fsync_seconds"], res["fsync_cpu_seconds"] = time.perf_counter() - t, _cpu() - c
    except BaseException:
        dec.abort()
        raise
    return stats


def _cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)  # every thread of this process
    return ru.ru_utime + ru.ru_stime


def child_main(spec: dict[str, Any]) -> int:
    t0 = time.perf_counter()
    import nephele.delta

    res: dict[str, Any] = {"import_seconds": time.perf_counter() - t0}
    stats: Any
    if spec["op"] == "index":
        refs = {k: Path(v) for k, v in spec["refs"].items()}
        for path in refs.values():
            nephele.delta.BlockIndex.index_path(path).unlink(missing_ok=True)
        t, c = time.perf_counter(), _cpu()
        stats = {k: nephele.delta.BlockIndex.load_or_build(path).nblocks for k, path in refs.items()}
    else:
        if spec.get("warmup"):  # tiny encode+decode first: numba's cached code is loaded before timing
            t = time.perf_counter()
            for op in ("encode", "decode"):
                _child_op({**spec["warmup"], "op": op, "codec": spec.get("codec")})
            res["warmup_seconds"] = time.perf_counter() - t
        t, c = time.perf_counter(), _cpu()
        stats = _timed_decode(spec, res) if spec["op"] == "decode" else _child_op(spec)
    res.setdefault("seconds", time.perf_counter() - t)
    res.setdefault("cpu_seconds", _cpu() - c)
    res["stats"] = stats.to_dict() if hasattr(stats, "to_dict") else jsonable(stats)
    if hasattr(stats, "table"):
        res["table"] = stats.table()
    print(json.dumps(res))
    return 0


def jsonable(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [jsonable(v) for v in obj]
    if isinstance(obj, bool | int | float | str) or obj is None:
        return obj
    if hasattr(obj, "item"):  # numpy scalar
        return obj.item()
    if hasattr(obj, "__dict__"):
        return {k: jsonable(v) for k, v in vars(obj).items() if not k.startswith("_")}
    return repr(obj)


def run_child(spec: dict[str, Any]) -> tuple[Proc, dict[str, Any] | None]:
    p = run_proc([sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)])
    if p.returncode != 0:
        return p, None
    try:
        res: dict[str, Any] = json.loads(p.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return p, None
    return p, res


def _fail(run: Run, p: Proc, what: str) -> Run:
    tail = p.stderr.strip().splitlines()[-1] if p.stderr.strip() else f"exit status {p.returncode}"
    run.error = f"{what}: {tail}"
    return run


def measure_nephele(
    img: Images, tmp: Path, tiny: dict[str, Any], codec: str | None, repeat: int
) -> list[Run]:
    """Encode and decode, each in its own process. The timed call follows a tiny warm-up call in the same
    process (steady state; the targets use it); one extra run without warm-up gives the cost of a call in
    a fresh process, which also loads numba's cached machine code."""
    stream = tmp / f"nephele-{codec or 'default'}.stream"
    label = f"nephele {codec or '(default codec)'}"
    n_in = img.target_bytes
    enc = Run(f"{label} encode", "encode", n_in)
    dec = Run(f"{label} decode", "decode", n_in)
    espec = {
        "op": "encode",
        "codec": codec,
        "refs": {k: str(v) for k, v in img.refs.items()},
        "targets": [
            {"name": name, "kind": name, "path": str(path), "base": base}
            for name, (path, base) in img.targets.items()
        ],
        "out": str(stream),
    }
    outputs = {name: tmp / f"{name}.decoded" for name in img.targets}
    dspec = {
        "op": "decode",
        "inp": str(stream),
        "refs": espec["refs"],
        "outputs": {k: str(v) for k, v in outputs.items()},
    }
    for run, spec, files in ((enc, espec, img.all_files()), (dec, dspec, [*img.refs.values(), stream])):
        samples: list[tuple[Proc, dict[str, Any]]] = []
        fresh = 0.0
        for i in range(repeat + 1):
            for o in outputs.values():
                o.unlink(missing_ok=True)
            warm(files)
            p, res = run_child({**spec, "warmup": tiny} if i else spec)
            if res is None:
                _fail(run, p, run.method)
                return [enc, dec]
            if i:
                samples.append((p, res))
            else:
                fresh = float(res["seconds"])
        samples.sort(key=lambda s: float(s[1]["seconds"]))
        p, res = samples[len(samples) // 2]  # the median run
        run.seconds = float(res["seconds"])
        run.cpu_seconds = float(res["cpu_seconds"])
        run.max_rss_kib = max(s[0].max_rss_kib for s in samples)
        run.anon_kib = max(s[0].anon_kib for s in samples)
        run.extra = {
            "all_seconds": [round(float(s[1]["seconds"]), 4) for s in samples],
            "fresh_process_call_seconds": round(fresh, 4),
            "process_seconds": round(p.seconds, 3),
            "import_seconds": round(float(res["import_seconds"]), 3),
            "warmup_seconds": round(float(res.get("warmup_seconds", 0.0)), 3),
            "process_cpu_seconds": round(p.cpu_seconds, 3),
            "stats": res["stats"],
            "table": res.get("table"),
        }
        if run is enc:
            enc.output_bytes = stream.stat().st_size
        else:
            dec.fsync_seconds = float(res["fsync_seconds"])
            dec.extra["fsync_cpu_seconds"] = round(float(res["fsync_cpu_seconds"]), 4)
            dec.extra["all_fsync_seconds"] = [round(float(s[1]["fsync_seconds"]), 4) for s in samples]
            dec.output_bytes = n_in
            bad = [n for n, (path, _) in img.targets.items() if not same_bytes(outputs[n], path)]
            dec.extra["identical_to_targets"] = not bad
            if bad:
                dec.error = f"decoded {', '.join(bad)} differ from the original image bytes"
    for o in [*outputs.values(), stream]:
        o.unlink(missing_ok=True)
    return [enc, dec]


def measure_index(img: Images) -> Run:
    """Hash the base images into their stored block index (done once per base image, when it is imported;
    the encode runs below find it beside the image)."""
    run = Run(
        "nephele block index of D0+M0 (once)", "index", sum(p.stat().st_size for p in img.refs.values())
    )
    warm(list(img.refs.values()))
    p, res = run_child({"op": "index", "refs": {k: str(v) for k, v in img.refs.items()}})
    if res is None:
        return _fail(run, p, run.method)
    run.seconds, run.cpu_seconds, run.max_rss_kib = (
        float(res["seconds"]),
        float(res["cpu_seconds"]),
        p.max_rss_kib,
    )
    run.anon_kib = p.anon_kib
    run.extra = {"process_seconds": round(p.seconds, 3), "blocks": res["stats"]}
    return run


def engine_vs_truth(enc: Run, truth: Mapping[str, Any]) -> list[str]:
    """The engine's own block counts next to the generator's truth (both in blocks)."""
    stats = enc.extra.get("stats") or {}
    lines = []
    for name in ("disk", "memory"):
        st, tr = stats.get(name), truth[name]["blocks"]
        if not isinstance(st, Mapping):
            continue
        pairs = [("zero", "zeros", "zero"), ("by ref", "by_ref", "dup"), ("by value", "by_value", "new")]
        cells = []
        for label, ek, tk in pairs:
            e, t = st.get(ek), tr[tk]
            mark = "" if e == t else f" ({'+' if (e or 0) > t else ''}{(e or 0) - t})"
            cells.append(f"{label} {e}/{t}{mark}")
        lines.append(f"  {name:7s} engine/truth blocks: " + ", ".join(cells))
    return lines


def tiny_workload(img: Images, tmp: Path) -> dict[str, Any]:
    """The first MiB of each image, for warm-up calls: an encode+decode spec (op is set by the caller)."""
    small = tmp / "tiny"
    small.mkdir()
    files = {}
    for name, path in [*img.refs.items(), *((n, p) for n, (p, _) in img.targets.items())]:
        with open(path, "rb") as f:
            (small / name).write_bytes(f.read(1 << 20))
        files[name] = small / name
    return {
        "refs": {k: str(files[k]) for k in img.refs},
        "targets": [
            {"name": n, "kind": n, "path": str(files[n]), "base": b} for n, (_, b) in img.targets.items()
        ],
        "out": str(small / "stream"),
        "inp": str(small / "stream"),
        "outputs": {n: str(small / f"{n}.out") for n in img.targets},
    }


def first_call(tiny: dict[str, Any]) -> dict[str, Any]:
    """A tiny encode in a fresh process: compiles once if numba's on-disk cache is cold (cache=True), then
    only loads it. Reported, never part of a timed run."""
    p, res = run_child({**tiny, "op": "encode", "codec": None})
    if res is None:
        return {"error": p.stderr.strip().splitlines()[-1] if p.stderr.strip() else f"exit {p.returncode}"}
    return {"process_seconds": round(p.seconds, 3), "encode_seconds": round(float(res["seconds"]), 3)}


# ---------------------------------------------------------------------------------------------------------
# The other tools: one command sequence per image; each step's output is the next step's input.


Step = tuple[list[str], Path]  # command, the file it writes


def tool_steps(tool: str, base: Path, target: Path, out: Path) -> list[Step]:
    o = out / f"{target.stem}.{tool}"
    if tool == "xdelta3":
        return [(["xdelta3", "-e", "-f", "-s", str(base), str(target), str(o)], o)]
    if tool == "xdelta3-B1G":
        return [(["xdelta3", "-e", "-f", "-B", str(1 << 30), "-s", str(base), str(target), str(o)], o)]
    if tool == "zstd-patch":
        return [
            (["zstd", "-q", "-f", "-3", "--long=31", f"--patch-from={base}", str(target), "-o", str(o)], o)
        ]
    if tool == "zstd":
        return [(["zstd", "-q", "-f", "-1", str(target), "-o", str(o)], o)]
    if tool == "rsync-zstd":
        # rsync diffs target against a same-named file in the destination: a hard link to the base (the batch
        # mode never writes the destination). Local copies default to --whole-file, hence --no-whole-file.
        dest = out / f"rsync-dest-{target.stem}"
        dest.mkdir(exist_ok=True)
        basis = dest / target.name
        if not basis.exists():
            try:
                os.link(base, basis)
            except OSError:
                shutil.copyfile(base, basis)
        batch = out / f"{target.stem}.rsync-batch"
        rsync = [
            "rsync",
            f"--only-write-batch={batch}",
            "--block-size=4096",
            "--no-whole-file",
            "--ignore-times",
        ]
        return [
            ([*rsync, str(target), str(dest) + "/"], batch),
            (["zstd", "-q", "-f", "-1", str(batch), "-o", str(batch) + ".zst"], Path(str(batch) + ".zst")),
        ]
    raise ValueError(f"unknown tool {tool!r}; choose from {', '.join(TOOLS)}")


TOOL_BINARIES = {
    "xdelta3": ("xdelta3",),
    "xdelta3-B1G": ("xdelta3",),
    "zstd-patch": ("zstd",),
    "rsync-zstd": ("rsync", "zstd"),
    "zstd": ("zstd",),
}
TOOL_LABEL = {
    "xdelta3": "xdelta3 -e -s (default -B 64 MiB)",
    "xdelta3-B1G": "xdelta3 -e -B 1GiB -s",
    "zstd-patch": "zstd -3 --patch-from --long=31",
    "rsync-zstd": "rsync batch -B 4096, then zstd -1",
    "zstd": "zstd -1 (whole image, no base)",
}


def measure_tool(tool: str, img: Images, tmp: Path) -> Run:
    run = Run(TOOL_LABEL[tool], "encode", img.target_bytes)
    out = tmp / tool
    out.mkdir()
    try:
        for name, (target, base_id) in img.targets.items():
            base = img.refs[base_id]
            steps = tool_steps(tool, base, target, out)
            warm([base, target])
            per: dict[str, Any] = {
                "seconds": 0.0,
                "cpu_seconds": 0.0,
                "max_rss_kib": 0,
                "anon_kib": 0,
                "steps": [],
            }
            for cmd, produced in steps:
                p = run_proc(cmd)
                if p.returncode != 0:
                    return _fail(run, p, " ".join(cmd[:2]))
                size = produced.stat().st_size
                per["steps"].append({"cmd": " ".join(cmd), "seconds": round(p.seconds, 3), "bytes": size})
                per["seconds"] += p.seconds
                per["cpu_seconds"] += p.cpu_seconds
                per["max_rss_kib"] = max(per["max_rss_kib"], p.max_rss_kib)
                per["anon_kib"] = max(per["anon_kib"], p.anon_kib)
            per["output_bytes"] = size
            run.per_image[name] = per
            run.seconds += per["seconds"]
            run.cpu_seconds += per["cpu_seconds"]
            run.output_bytes += size
            run.max_rss_kib = max(run.max_rss_kib, per["max_rss_kib"])
            run.anon_kib = max(run.anon_kib, per["anon_kib"])
            for _, produced in steps:
                produced.unlink(missing_ok=True)
        return run
    finally:
        shutil.rmtree(out, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------------
# Report.


def evaluate(runs: Sequence[Run]) -> list[tuple[str, list[Check]]]:
    """The issue-3 targets, per nephele codec, against `xdelta3 -e -s` (the issue's command); the -B 1 GiB
    variant and calls in a fresh process are shown as information."""
    by = {r.method: r for r in runs if r.error is None}
    xd = by.get(TOOL_LABEL["xdelta3"])
    xd1g = by.get(TOOL_LABEL["xdelta3-B1G"])
    groups: list[tuple[str, list[Check]]] = []
    for enc in (r for r in runs if r.method.startswith("nephele") and r.role == "encode" and r.error is None):
        label = enc.method.removesuffix(" encode")
        dec = by.get(f"{label} decode")
        out_mb = enc.output_bytes / MB
        checks: list[Check] = []
        if xd is not None:
            ratio, speedup = enc.output_bytes / xd.output_bytes, xd.seconds / enc.seconds
            checks += [
                Check("output <= 0.75 x xdelta3's", ratio, MAX_SIZE_VS_XDELTA, False,
                      f"{out_mb:.1f} MB vs {xd.output_bytes / MB:.1f} MB"),
                Check("encode >= 20 x faster than xdelta3", speedup, MIN_SPEEDUP_VS_XDELTA, True,
                      f"{enc.seconds:.2f} s vs {xd.seconds:.1f} s"),
            ]  # fmt: skip
        if xd1g is not None:
            ratio = enc.output_bytes / xd1g.output_bytes
            detail = f"{out_mb:.1f} MB vs {xd1g.output_bytes / MB:.1f} MB"
            checks.append(
                Check("(info) output vs xdelta3 -B 1GiB", ratio, MAX_SIZE_VS_XDELTA, False, detail, True)
            )
        for r in (enc, dec):
            if r is None:
                continue
            what = "encode >= 1 GB/s of input" if r is enc else "decode >= 1 GB/s (page cache, verified)"
            checks.append(
                Check(
                    what, r.mbps / 1000, MIN_GBPS, True, f"{r.input_bytes / MB:.0f} MB in {r.seconds:.2f} s"
                )
            )
            if r.cpu_seconds > 0:  # steadier than wall time on a shared machine; all threads counted
                what, detail = f"(info) {r.role}, per CPU second", f"{r.cpu_seconds:.2f} CPU s, all threads"
                checks.append(Check(what, r.input_bytes / r.cpu_seconds / 1e9, MIN_GBPS, True, detail, True))
            if r.fsync_seconds > 0:
                total = r.seconds + r.fsync_seconds
                what, detail = "(info) decode, then fsync", f"{r.seconds:.2f} + {r.fsync_seconds:.2f} s fsync"
                checks.append(Check(what, r.input_bytes / total / 1e9, MIN_GBPS, True, detail, True))
            fresh = float(r.extra.get("fresh_process_call_seconds") or 0.0)
            if fresh > 0:
                what, detail = (
                    f"(info) {r.role}, call in a fresh process",
                    f"{fresh:.2f} s (loads numba's cache)",
                )
                checks.append(Check(what, r.input_bytes / fresh / 1e9, MIN_GBPS, True, detail, True))
        groups.append((label, checks))
    return groups


def _fmt(v: float, digits: int = 1) -> str:
    return f"{v:,.{digits}f}"


def render_table(runs: Sequence[Run]) -> str:
    head = ["method", "wall s", "cpu s", "in MB/s", "fsync s", "out MB", "RSS MiB", "anon MiB"]
    for m in RATES_MBIT:
        head += [f"xfer@{m}", f"total@{m}"]
    rows: list[list[str]] = []
    for r in runs:
        if r.error is not None:
            rows.append([r.method, "FAILED: " + r.error])
            continue
        row = [r.method, _fmt(r.seconds, 2), _fmt(r.cpu_seconds, 2), _fmt(r.mbps, 0)]
        row.append(_fmt(r.fsync_seconds, 2) if r.role == "decode" else "-")
        if r.role == "encode":
            row += [_fmt(r.output_bytes / MB), _fmt(r.max_rss_kib / 1024, 0), _fmt(r.anon_kib / 1024, 0)]
            for m in RATES_MBIT:
                x = r.transfer_s(m)
                row += [_fmt(x), _fmt(x + r.seconds)]
        else:
            row += ["-", _fmt(r.max_rss_kib / 1024, 0), _fmt(r.anon_kib / 1024, 0)] + ["-"] * (
                2 * len(RATES_MBIT)
            )
        rows.append(row)
    widths = [max([len(head[i]), *(len(r[i]) for r in rows if len(r) > 2)]) for i in range(len(head))]
    lines = [
        "  ".join(
            h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(head, widths, strict=True))
        )
    ]
    lines.append("  ".join("-" * w for w in widths))
    for row in rows:
        if len(row) == 2:
            lines.append(f"{row[0].ljust(widths[0])}  {row[1]}")
        else:
            lines.append(
                "  ".join(
                    c.ljust(w) if i == 0 else c.rjust(w)
                    for i, (c, w) in enumerate(zip(row, widths, strict=True))
                )
            )
    return "\n".join(lines)


def render_per_image(runs: Sequence[Run]) -> str:
    lines = []
    for r in runs:
        if r.per_image and r.error is None:
            parts = [
                f"{n} {v['seconds']:.1f} s, {v['output_bytes'] / MB:.1f} MB, "
                f"{v['max_rss_kib'] / 1024:.0f} MiB RSS"
                for n, v in r.per_image.items()
            ]
            lines.append(f"  {r.method}: " + "; ".join(parts))
    return "\n".join(lines)


def render_checks(groups: Sequence[tuple[str, list[Check]]]) -> str:
    lines = []
    for label, checks in groups:
        lines.append(f"targets for {label} (issue 3):")
        for c in checks:
            unit = " x" if " x " in c.what or "xdelta3" in c.what else " GB/s"
            verdict = "info" if c.info_only else ("PASS" if c.ok else "FAIL")
            if c.info_only:
                verdict += " (would " + ("pass" if c.ok else "fail") + ")"
            lines.append(
                f"  {c.what:38s} {c.value:8.3f}{unit:5s} (limit {c.limit:g})  {c.detail:32s} {verdict}"
            )
    return "\n".join(lines)


def machine_info() -> dict[str, Any]:
    cpu = ""
    with contextlib.suppress(OSError):
        cpu = next(
            (
                ln.split(":", 1)[1].strip()
                for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")
            ),
            "",
        )
    mem = ""
    with contextlib.suppress(OSError):
        mem = next(
            (
                ln.split(":", 1)[1].strip()
                for ln in Path("/proc/meminfo").read_text().splitlines()
                if ln.startswith("MemTotal")
            ),
            "",
        )
    versions = {}
    for tool, arg in (("xdelta3", "-V"), ("zstd", "-V"), ("rsync", "--version")):
        with contextlib.suppress(OSError):
            r = subprocess.run([tool, arg], capture_output=True, text=True, check=False)
            versions[tool] = (r.stdout + r.stderr).strip().splitlines()[0]
    return {
        "host": platform.node(),
        "kernel": platform.release(),
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "mem_total": mem,
        "python": platform.python_version(),
        "tools": versions,
    }


@contextlib.contextmanager
def scratch(workdir: Path) -> Iterator[Path]:
    workdir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="run-", dir=workdir) as d:
        yield Path(d)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument(
        "--workdir", type=Path, default=ROOT / ".cache" / "bench", help="workload cache and scratch space"
    )
    ap.add_argument(
        "--disk-mib",
        type=int,
        help=f"base disk size (default {workload.REF_DISK_MIB}, --quick {QUICK_DISK_MIB})",
    )
    ap.add_argument(
        "--mem-mib",
        type=int,
        help=f"base memory size (default {workload.REF_MEM_MIB}, --quick {QUICK_MEM_MIB})",
    )
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--scale", type=float, default=1.0, help="dirtied amounts, as in bench/workload.py")
    ap.add_argument("--quick", action="store_true", help="small workload for a smoke run")
    ap.add_argument("--tools", default=",".join(TOOLS), help=f"comma list of {', '.join(TOOLS)} (or 'none')")
    ap.add_argument(
        "--codecs", default="lz4,zstd", help="nephele codecs to run, comma list ('default' = the engine's)"
    )
    ap.add_argument("--repeat", type=int, default=1, help="nephele runs per measurement (median reported)")
    ap.add_argument("--json", type=Path, help="also write all results here")
    ap.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        return child_main(json.loads(a.child))
    tools = [] if a.tools == "none" else [t.strip() for t in a.tools.split(",") if t.strip()]
    if unknown := [t for t in tools if t not in TOOLS]:
        ap.error(f"unknown tool(s) {', '.join(unknown)}; choose from {', '.join(TOOLS)}")
    if gone := sorted({b for t in tools for b in TOOL_BINARIES[t] if shutil.which(b) is None}):
        ap.error(f"not on PATH: {', '.join(gone)} (run tools/bootstrap.sh)")
    disk = a.disk_mib or (QUICK_DISK_MIB if a.quick else workload.REF_DISK_MIB)
    mem = a.mem_mib or (QUICK_MEM_MIB if a.quick else workload.REF_MEM_MIB)
    codecs = [None if c == "default" else c for c in a.codecs.split(",") if c]
    try:
        img, how = ensure_workload(a.workdir, disk, mem, a.seed, a.scale)
    except workload.WorkloadError as e:
        print(f"delta_vs_tools: {e}", file=sys.stderr)
        return 2
    load0 = os.getloadavg()
    started = time.time()
    runs: list[Run] = []
    with scratch(a.workdir) as tmp:
        tiny = tiny_workload(img, tmp)
        jit = first_call(tiny)
        if codecs:
            runs.append(measure_index(img))
        for codec in codecs:
            print(f"measuring nephele {codec or '(default codec)'} ...", file=sys.stderr)
            runs += measure_nephele(img, tmp, tiny, codec, max(1, a.repeat))
        for t in tools:
            print(f"measuring {TOOL_LABEL[t]} ...", file=sys.stderr)
            runs.append(measure_tool(t, img, tmp))
    load1 = os.getloadavg()
    groups = evaluate(runs)
    truth = img.summary["truth"]
    mach = machine_info()
    print()
    print(f"workload: {img.dir} ({how}); D0 {disk} MiB + M0 {mem} MiB, seed {a.seed}, scale {a.scale:g}")
    print(
        f"  D1+M1 = {img.target_bytes / MB:.0f} MB; truth new blocks {truth['new_bytes_total'] / MB:.1f} MB "
        f"(the ideal payload before compression); dirtied memory MiB "
        + ", ".join(f"{k} {truth['memory']['mib'][k]}" for k in ("zero", "dup", "new"))
    )
    print(
        f"machine: {mach['cpu']}, {mach['cpus']} CPUs; "
        f"load average {load0[0]:.2f} before, {load1[0]:.2f} after"
    )
    if "error" in jit:
        print(f"nephele warm-up failed: {jit['error']}")
    else:
        print(
            f"nephele first call, fresh process, 1 MiB images (compiles only if numba's cache is cold): "
            f"{jit['process_seconds']:.2f} s"
        )
    print()
    print(render_table(runs))
    print("\nper image (disk; memory):")
    print(render_per_image(runs))
    print("\nxfer@R = output bytes over R Mbit/s, in s; total@R = encode wall time + xfer (sequential).")
    print("in MB/s = D1+M1 bytes (D0+M0 for the index) / wall s. RSS = peak resident set of the process")
    print(
        "(file pages it maps count too); anon = peak anonymous memory of its main process (sampled, 10 ms)."
    )
    print(
        "nephele decode: wall s = the stream applied and verified, images in the page cache; fsync s = then\n"
        "close(): fsync of the outputs and their directory, and the rename (the disk's cost, timed apart)."
    )
    for r in runs:
        if r.method.startswith("nephele") and r.role == "encode" and r.error is None:
            print(f"\n{r.method}: engine stats")
            if r.extra.get("table"):
                print("  " + str(r.extra["table"]).replace("\n", "\n  "))
            print("\n".join(engine_vs_truth(r, truth)))
    print()
    if groups:
        print(render_checks(groups))
    else:
        print("targets: not evaluated (no successful nephele encode)")
    failed = [r for r in runs if r.error is not None]
    missed = [c for _, cs in groups for c in cs if not c.ok and not c.info_only]
    if a.json:
        report = {
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
            "machine": mach,
            "loadavg_before": load0,
            "loadavg_after": load1,
            "workload": {"dir": str(img.dir), "how": how, "params": img.summary["params"], "truth": truth},
            "nephele_first_call": jit,
            "runs": [{**dataclasses.asdict(r), "mbps": r.mbps} for r in runs],
            "targets": [
                {"nephele": lbl, "checks": [{**dataclasses.asdict(c), "ok": c.ok} for c in cs]}
                for lbl, cs in groups
            ],
        }
        a.json.write_text(json.dumps(report, indent=1) + "\n")
    if failed:
        return 1
    return 1 if a.strict and (missed or not groups) else 0


if __name__ == "__main__":
    sys.exit(main())
