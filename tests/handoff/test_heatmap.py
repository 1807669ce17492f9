"""The heatmap: counters per 4 KiB block, the max-pooled tile pyramid, PNG validity (decoded back here
with zlib, independently of the writer), the hooks in the memory channel and the NBD tap, and the page's
server (state, tiles, stats text, images kept with the log)."""

from __future__ import annotations

import functools
import json
import random
import struct
import urllib.error
import urllib.request
import zlib
from pathlib import Path

import numpy as np
import pytest

from nephele.errors import InvalidInput
from nephele.handoff import heatmap_server as hs
from nephele.handoff.forward import NbdTap
from nephele.handoff.heatmap import (
    LUT,
    TILE,
    BlockMap,
    Heatmap,
    grid_width,
    image_paths,
    png_grey,
)
from nephele.handoff.memory import MemoryDestination, mem_ref_id
from nephele.handoff.records import HandoffRecord, Records
from nephele.vmstate import MigrationStreamParser, Page, ZeroPage

# ------------------------------------------------------------------------------------------ PNG decoding


def decode_png(data: bytes) -> np.ndarray:
    """8-bit greyscale, RGB or RGBA PNG -> (h, w) or (h, w, channels) uint8, checking every CRC and
    undoing all five scanline filters (the screenshots of the browser test use them all)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG signature"
    pos, idat, head = 8, bytearray(), None
    while pos < len(data):
        (n,) = struct.unpack_from(">I", data, pos)
        kind = data[pos + 4 : pos + 8]
        body = data[pos + 8 : pos + 8 + n]
        (crc,) = struct.unpack_from(">I", data, pos + 8 + n)
        assert zlib.crc32(kind + body) == crc, f"bad CRC in {kind!r}"
        pos += 12 + n
        if kind == b"IHDR":
            head = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat += body
        elif kind == b"IEND":
            break
    assert head is not None, "no IHDR"
    w, h, depth, ctype, _comp, _filt, interlace = head
    assert depth == 8 and interlace == 0 and ctype in (0, 2, 6), head
    ch = {0: 1, 2: 3, 6: 4}[ctype]
    raw = np.frombuffer(zlib.decompress(bytes(idat)), np.uint8)
    stride = w * ch
    assert raw.size == h * (stride + 1), "IDAT size does not match the header"
    rows = raw.reshape(h, stride + 1)
    out = np.zeros((h, stride), np.int32)
    prev = np.zeros(stride, np.int32)
    for y in range(h):
        f, line = rows[y, 0], rows[y, 1:].astype(np.int32)
        if f == 0:
            cur = line
        elif f == 2:
            cur = (line + prev) & 0xFF
        else:
            cur = np.zeros(stride, np.int32)
            for x in range(stride):
                a = cur[x - ch] if x >= ch else 0
                b = prev[x]
                c = prev[x - ch] if x >= ch else 0
                if f == 1:
                    p = a
                elif f == 3:
                    p = (a + b) // 2
                else:
                    assert f == 4, f"unknown filter {f}"
                    pa, pb, pc = abs(b - c), abs(a - c), abs(a + b - 2 * c)
                    p = a if pa <= pb and pa <= pc else b if pb <= pc else c
                cur[x] = (line[x] + p) & 0xFF
        out[y] = cur
        prev = cur
    img = out.astype(np.uint8)
    return img.reshape(h, w) if ch == 1 else img.reshape(h, w, ch)


# ------------------------------------------------------------------------------------------ PNG + maps


def test_png_round_trips_exactly() -> None:
    rng = np.random.default_rng(7)
    for shape in ((1, 1), (3, 5), (256, 256), (17, 300)):
        a = rng.integers(0, 256, shape, dtype=np.uint8)
        assert np.array_equal(decode_png(png_grey(a)), a)


def test_png_refuses_empty_images() -> None:
    with pytest.raises(InvalidInput):
        png_grey(np.zeros((0, 4), np.uint8))
    with pytest.raises(InvalidInput):
        png_grey(np.zeros(4, np.uint8))


def test_brightness_scale_is_fixed_and_monotone() -> None:
    assert [int(LUT[c]) for c in (0, 1, 2, 4, 8, 16, 1000, 65535)] == [0, 64, 112, 160, 208, 255, 255, 255]
    assert (np.diff(LUT.astype(int)) >= 0).all()


def test_layout_is_near_square_with_power_of_two_rows() -> None:
    assert grid_width(0) == grid_width(1) == 1
    assert grid_width(65536) == 256  # 256 MiB of memory: 256 x 256
    m = BlockMap("disk", 25 * 10**9 // 4096)  # a 25 GB disk
    assert (m.width, m.height) == (4096, 1491)
    assert m.nlevels() == 5
    assert [lv.shape for lv in m.levels()] == [(1491, 4096), (746, 2048), (373, 1024), (187, 512), (94, 256)]


def test_counts_accumulate_repeat_and_saturate() -> None:
    m = BlockMap("memory", 100)
    m.add(np.array([3, 5, 5, 99]))
    m.add(np.array([5]))
    m.add_range(10, 3)
    assert m.counts[[3, 5, 99, 10, 11, 12, 13]].tolist() == [1, 3, 1, 1, 1, 1, 0]
    assert m.writes == 8 and m.summary()["dirtied_blocks"] == 6 and m.summary()["max_count"] == 3
    m.add(np.full(70000, 7))
    assert int(m.counts[7]) == 65535
    v = m.version
    m.add(np.array([], np.int64))
    assert m.version == v  # an empty batch is no update


def test_memory_map_grows_for_ram_blocks_beyond_the_guest_ram() -> None:
    m = BlockMap("memory", 16)
    m.add(np.array([40]))
    assert m.nblocks == 41 and m.counts[40] == 1 and m.grid().shape == (m.height, m.width)
    with pytest.raises(InvalidInput):
        m.add(np.array([-1]))


def test_pyramid_max_pools_so_one_dirty_block_stays_visible() -> None:
    m = BlockMap("disk", 25 * 10**9 // 4096)
    last = m.nblocks - 1
    m.add(np.array([last]))
    y, x = divmod(last, m.width)
    top = m.nlevels() - 1
    tile = decode_png(m.tile(top, 0, 0))
    assert tile.shape == m.levels()[top].shape
    assert tile[y >> top, x >> top] == 64 and int(tile.sum()) == 64
    full = decode_png(m.tile(0, x // TILE, y // TILE))
    assert full[y % TILE, x % TILE] == 64 and int(full.sum()) == 64
    # an edge tile is cropped to the image
    assert decode_png(m.tile(0, m.width // TILE - 1, m.height // TILE)).shape == (m.height % TILE, TILE)
    for bad in ((top + 1, 0, 0), (0, 99, 0), (0, 0, 99), (0, -1, 0)):
        with pytest.raises(InvalidInput):
            m.tile(*bad)


def test_pyramid_levels_match_a_direct_max_over_each_square() -> None:
    rng = np.random.default_rng(3)
    m = BlockMap("memory", 300_000)
    for _ in range(20):
        m.add(rng.integers(0, m.nblocks, 500))
    g = m.grid()
    for level, arr in enumerate(m.levels()):
        f = 1 << level
        for _ in range(30):
            y, x = int(rng.integers(0, arr.shape[0])), int(rng.integers(0, arr.shape[1]))
            assert arr[y, x] == g[y * f : (y + 1) * f, x * f : (x + 1) * f].max()


def test_images_are_kept_beside_the_log(tmp_path: Path) -> None:
    rec = HandoffRecord("10.0.0.1", "web-1", "u1", 64 * 4096, 32 * 4096)
    records = Records(tmp_path / "logs", rec)
    h = Heatmap(rec.memory_bytes, rec.disk_bytes)
    h.observe("memory", np.array([0, 1, 1, 63]))
    h.observe("memory", np.array([1]), "zero")
    h.observe("disk", np.arange(8, 12))
    stem = records.log_path.stem.removeprefix("handoff_")
    paths = h.save(records.log_path.parent, stem)
    want = image_paths(records.log_path)
    assert paths == [want["memory"], want["disk"]]
    assert want["memory"].name == f"mem_{stem}.png" and want["disk"].name == f"disk_{stem}.png"
    mem = decode_png(want["memory"].read_bytes())
    assert mem.shape == (8, 8) and mem.ravel().tolist()[:2] == [64, 140] and mem[7, 7] == 64
    assert int((mem > 0).sum()) == 3
    disk = decode_png(want["disk"].read_bytes())
    assert (disk.ravel()[8:12] == 64).all() and int((disk > 0).sum()) == 4
    assert not list(tmp_path.glob("logs/.*.tmp"))


def test_observe_never_raises_into_the_handoff() -> None:
    h = Heatmap(4096, 4096)
    h.observe("memory", np.array([-5]))
    assert h.error and "negative" in h.error
    h.observe("memory", np.array([0]))  # stopped: the maps stay as they were
    assert h.maps["memory"].writes == 0
    h.observe("video", np.array([0]))  # unknown kinds are ignored


# ------------------------------------------------------------------------------------------ hooks


def test_nbd_tap_reports_written_blocks() -> None:
    got: list[tuple[str, list[int], str]] = []
    tap = NbdTap()
    tap.observer = lambda kind, blocks, cls: got.append((kind, blocks.tolist(), cls))
    opt = struct.pack(">QII", NbdTap.OPT_MAGIC, 1, 3) + b"abc"

    def req(cmd: int, off: int, length: int) -> bytes:
        return struct.pack(">IHHQQI", NbdTap.REQ_MAGIC, 0, cmd, 1, off, length)

    stream = b"\0\0\0\1" + opt + req(1, 8192, 4096 * 2) + bytes(8192) + req(6, 4096 * 100, 4096 * 3)
    stream += req(1, 5000, 100) + b"x" * 100 + req(3, 0, 0)  # unaligned: blocks 1; FLUSH: nothing
    for i in range(0, len(stream), 7):  # in small pieces
        tap.feed(stream[i : i + 7])
    assert got == [("disk", [2, 3], "data"), ("disk", [100, 101, 102], "zero"), ("disk", [1], "data")]


def test_memory_channel_reports_every_page_record(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A synthetic multi-iteration stream through the real memory channel: the heatmap's counters equal
    the number of PAGE and ZERO records of each page in the stream, across three RAM blocks."""
    from tests.handoff import test_memory_synthetic as syn

    rng = random.Random(11)
    base = {name: rng.randbytes(n) for name, n in syn.BLOCKS}
    refs = {}
    for i, (name, _n) in enumerate(syn.BLOCKS[:2]):
        p = tmp_path / f"base{i}.ram"
        p.write_bytes(base[name])
        refs[mem_ref_id(name)] = p
    stream = syn.make_stream(rng, base, sections=10)
    total = sum(n for _, n in syn.BLOCKS)
    hm = Heatmap(total, 4096)
    classes: set[str] = set()

    def observe(kind: str, blocks: np.ndarray, cls: str) -> None:
        classes.add(cls)
        hm.observe(kind, blocks, cls)

    monkeypatch.setattr(syn, "MemoryDestination", functools.partial(MemoryDestination, observer=observe))
    got, _ss, ds = syn.run_pair(tmp_path, stream, refs, rng)
    assert got == stream and ds.verified  # type: ignore[attr-defined]

    first, acc = {}, 0
    for name, n in syn.BLOCKS:
        first[name] = acc
        acc += n // 4096
    want = np.zeros(total // 4096, np.int64)
    parser = MigrationStreamParser()
    for ev in parser.feed(stream):
        if type(ev) is Page or type(ev) is ZeroPage:
            want[first[ev.block] + ev.offset // 4096] += 1
    assert np.array_equal(hm.maps["memory"].counts.astype(np.int64), want)
    assert classes == {"data", "zero"}


# ------------------------------------------------------------------------------------------ settings


def test_heatmap_is_off_unless_asked(tmp_path: Path) -> None:
    assert hs.wanted_port(tmp_path, {}) is None
    assert hs.wanted_port(tmp_path, {"heatmap": None}) is None
    assert hs.wanted_port(tmp_path, {"heatmap": True}) == hs.DEFAULT_PORT
    assert hs.wanted_port(tmp_path, {"heatmap": 9000}) == 9000
    assert hs.wanted_port(tmp_path, {"heatmap": 0}) == 0
    (tmp_path / "config.json").write_text(json.dumps({"heatmap": 8555}))
    assert hs.wanted_port(tmp_path, {}) == 8555  # the node's setting
    assert hs.wanted_port(tmp_path, {"heatmap": False}) is None  # the handoff's own choice wins
    (tmp_path / "config.json").write_text(json.dumps({"heatmap": True}))
    assert hs.wanted_port(tmp_path, {}) == hs.DEFAULT_PORT


@pytest.mark.parametrize(
    ("config", "arg", "words"),
    [
        ("{", None, "config.json: not valid JSON"),
        ("[1]", None, "expected a JSON object"),
        ('{"heatmap": "yes"}', None, "config.json: 'heatmap'"),
        (None, 70000, "argument 'heatmap'"),
        (None, -1, "argument 'heatmap'"),
    ],
)
def test_bad_settings_are_named(tmp_path: Path, config: str | None, arg: object, words: str) -> None:
    if config is not None:
        (tmp_path / "config.json").write_text(config)
    with pytest.raises(InvalidInput, match=words):
        hs.wanted_port(tmp_path, {"heatmap": arg} if arg is not None else {})


# ------------------------------------------------------------------------------------------ server


def _get(url: str) -> tuple[int, str, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.headers.get("Content-Type", ""), r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("Content-Type", ""), e.read()


def test_page_server_serves_state_tiles_and_the_stats_text(tmp_path: Path) -> None:
    rec = HandoffRecord("10.0.0.9", "web-1", "u-9", 256 << 20, 64 << 20)
    records = Records(tmp_path / "logs", rec)
    s = hs.open_session(0, rec, records, "127.0.0.1")
    assert s is not None and s.port
    base = f"http://127.0.0.1:{s.port}/heatmap/"
    try:
        s.observe("memory", np.arange(0, 1000))
        s.observe("memory", np.arange(0, 10))
        s.observe("disk", np.array([16383]))
        rec.iteration, rec.wire, rec.frames = 2, {"memory": 3 << 20, "disk": 1 << 20}, 17
        rec.memory, rec.disk = (1010, 600, 400, 10), (1, 1, 0, 0)
        code, ctype, body = _get(base)
        assert code == 200 and ctype.startswith("text/html")
        for needle in (b'id="map-memory"', b'id="map-disk"', b'id="tb-memory-0"', b"state.json"):
            assert needle in body
        assert b"http://" not in body and b"https://" not in body  # nothing from elsewhere (no CDN)
        st = json.loads(_get(base + "state.json")[2])
        assert st["iterations"] == 2 and st["blobs"] == 17 and st["status"] == "running"
        assert st["wire_mib"] == "4.00" and st["wire_total_bytes"] == 4 << 20
        assert st["table_mib"]["memory"] == ["3.95", "2.34", "1.56", "0.04"]
        assert st["table_mib"]["disk"] == ["0.00", "0.00", "0.00", "0.00"]
        mm = st["maps"]["memory"]
        assert (mm["width"], mm["height"], mm["dirtied_blocks"], mm["writes"]) == (256, 256, 1000, 1010)
        assert st["maps"]["disk"]["dirtied_blocks"] == 1
        assert st["eta_s"] is not None and st["eta_s"] >= 0  # the first pass is under way
        code, ctype, png = _get(base + f"tile/memory/0/0/0.png?v={mm['version']}")
        assert code == 200 and ctype == "image/png"
        t = decode_png(png)
        assert t.shape == (256, 256) and t[0, :10].tolist() == [112] * 10 and t[0, 10] == 64 and t[4, 0] == 0
        disk = decode_png(_get(base + "disk.png")[2])
        assert disk.shape == (128, 128) and disk[127, 127] == 64 and int((disk > 0).sum()) == 1
        assert _get(base + "stats.txt")[2].decode().splitlines()[:3] == rec.render().splitlines()[:3]
        for bad in ("tile/memory/1/0/0.png", "tile/memory/0/5/0.png", "tile/cpu/0/0/0.png", "x", "../etc"):
            assert _get(base + bad)[0] == 404, bad
        req = urllib.request.Request(f"http://127.0.0.1:{s.port}/heatmap")
        opener = urllib.request.build_opener(NoRedirect)
        with pytest.raises(urllib.error.HTTPError) as e:
            opener.open(req, timeout=5)
        assert e.value.code == 301 and e.value.headers["Location"] == "/heatmap/"
    finally:
        rec.finished = rec.finished or 0.0
        saved = s.close(records)
    assert [p.name for p in saved] == [p.name for p in image_paths(records.log_path).values()]
    assert "heatmap images:" in records.log_path.read_text()
    with pytest.raises(OSError):
        urllib.request.urlopen(base, timeout=2)


class NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: object, **kw: object) -> None:
        return None


def test_a_busy_port_keeps_the_images_but_not_the_page(tmp_path: Path) -> None:
    import socket

    rec = HandoffRecord("10.0.0.9", "web-1", "u-9", 4096, 4096)
    records = Records(tmp_path / "logs", rec)
    with socket.create_server(("127.0.0.1", 0)) as busy:
        s = hs.open_session(busy.getsockname()[1], rec, records, "127.0.0.1")
        assert s is not None and s.port is None and s.error and "cannot serve" in s.error
        s.observe("memory", np.array([0]))
        saved = s.close(records)
    assert len(saved) == 2 and all(p.exists() for p in saved)
    assert "cannot serve the heatmap page" in records.log_path.read_text()


def test_client_flag_turns_the_page_on_per_handoff() -> None:
    from nephele.cli.client import build_parser

    parse = build_parser().parse_args
    assert parse(["edge-a", "handoff", "web-1", "edge-b"]).heatmap is None  # off unless the node says so
    assert parse(["edge-a", "handoff", "web-1", "edge-b", "--heatmap"]).heatmap is True
    assert parse(["edge-a", "handoff", "web-1", "edge-b", "--heatmap=9000"]).heatmap == 9000


def test_rate_is_recent_while_running_and_the_average_at_the_end() -> None:
    rec = HandoffRecord("10.0.0.9", "web-1", "u-9", 4096, 4096, started=1000.0)
    s = hs.HeatmapSession(rec, port=None)
    assert s.server is None and s.rate() == 0.0
    s._samples.extend([(10.0, 0), (12.0, 4_000_000)])
    assert s.rate() == 2_000_000.0
    rec.wire, rec.finished = {"memory": 8_000_000}, 1010.0
    assert s.rate() == 800_000.0 and s.eta() is None


class _FakeAgent:
    """An agent answering the handoff ops from a table (no node): what the controller sends, and the
    destination's ready event with the heatmap port."""

    def __init__(self, name: str, answers: dict[str, object]) -> None:
        self._name = name
        self.answers = answers
        self.calls: list[tuple[str, dict[str, object]]] = []

    @property
    def node(self) -> str:
        return self._name

    def call(
        self, op: str, args: object = None, *, timeout: object = None, progress: object = None
    ) -> object:
        self.calls.append((op, dict(args or {})))  # type: ignore[call-overload]
        if op == "handoff.receive" and callable(progress):
            ev = {"event": "ready", "memory_port": 1, "disk_port": 2, "heatmap_port": 8099}
            progress("@handoff " + json.dumps(ev))
        return self.answers[op]


def test_client_prints_the_page_url_and_asks_the_destination_for_it() -> None:
    import io

    from nephele.handoff.report import run_handoff
    from nephele.model import NodeSpec

    src = _FakeAgent(
        "edge-a",
        {"handoff.prepare": {"title": "web-1", "uuid": "u-1"}, "handoff.send": {"elapsed_s": 3.0}},
    )
    dst = _FakeAgent("edge-b", {"handoff.receive": {"downtime_s": 0.5, "iterations": 2}})
    out = io.StringIO()
    dest = NodeSpec(name="edge-b", address="10.9.0.2")
    run_handoff(src, dst, "web-1", dest, source_address="10.9.0.1", out=out, err=io.StringIO(), heatmap=True)
    assert "Heatmap: http://10.9.0.2:8099/heatmap/" in out.getvalue().splitlines()
    ((op, args),) = dst.calls
    assert op == "handoff.receive" and args["heatmap"] is True and args["heatmap_linger"] == 0.0
