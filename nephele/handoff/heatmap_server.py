"""The destination node's heatmap page for one running handoff: ``http://NODE:PORT/heatmap/``.

Off by default. A handoff asks for it with the receive argument ``heatmap`` (``true`` for DEFAULT_PORT,
or a port number; 0 picks a free one), or a node turns it on for every incoming handoff in
``<root>/config.json``: ``{"heatmap": true}`` or ``{"heatmap": 8023}``. The page lives as long as the
handoff's receive call (plus ``heatmap_linger`` seconds after the end, so the final state can be seen);
the images are kept beside the handoff's log as ``mem_from_<ip>_at_<ts>.png`` / ``disk_...png``.

    /heatmap/                        the page: two zoomable tile viewers and the live stats (vanilla JS)
    /heatmap/state.json              stats and map versions, polled every second by the page
    /heatmap/stats.txt               the same text as the handoff's .stats file, as of now
    /heatmap/tile/KIND/L/X/Y.png     one 256x256 tile of level L (0 = one pixel per 4 KiB block)
    /heatmap/KIND.png                the whole map at one pixel per block

The stats come from the handoff's own record (the object its .stats file is rendered from), so the page
and the file say the same thing; the rate and the ETA are derived here.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import json
import re
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from typing import Any

from nephele.errors import InvalidInput
from nephele.handoff.heatmap import BLOCK, KINDS, TILE, Heatmap, image_paths
from nephele.handoff.records import HandoffRecord, Records

DEFAULT_PORT = 8023  # next to the handoff port (8022)
CONFIG = "config.json"
MAX_LINGER = 300.0
MiB = 1 << 20
RATE_WINDOW = 5  # seconds of wire bytes the rate is averaged over
_TILE_PATH = re.compile(r"^/heatmap/tile/(memory|disk)/(\d{1,2})/(\d{1,6})/(\d{1,6})\.png$")


def wanted_port(root: Path, args: dict[str, Any]) -> int | None:
    """The port asked for by the handoff (args["heatmap"]) or else by the node's config; None: off."""
    v = args.get("heatmap")
    where = "handoff.receive argument 'heatmap'"
    if v is None:
        cfg = root / CONFIG
        if not cfg.is_file():
            return None
        try:
            conf = json.loads(cfg.read_text())
        except (OSError, ValueError) as exc:
            raise InvalidInput(f"{cfg}: not valid JSON ({exc})") from None
        if not isinstance(conf, dict):
            raise InvalidInput(f"{cfg}: expected a JSON object")
        v, where = conf.get("heatmap"), f"{cfg}: 'heatmap'"
    if v is None or v is False:
        return None
    if v is True:
        return DEFAULT_PORT
    if isinstance(v, int) and 0 <= v <= 65535:
        return v
    raise InvalidInput(f"{where}: expected true, false or a port number (0-65535), not {v!r}")


@functools.cache
def page() -> bytes:
    """The page (heatmap.html beside this module: HTML, CSS and vanilla JS, no external resources)."""
    return resources.files("nephele.handoff").joinpath("heatmap.html").read_bytes()


def _mib(blocks: int) -> str:
    return f"{blocks * BLOCK / MiB:.2f}"  # as the .stats table prints it


class HeatmapSession:
    """The maps of one handoff and (unless the port could not be opened) the server of its page."""

    def __init__(self, record: HandoffRecord, address: str = "", port: int | None = DEFAULT_PORT) -> None:
        self.record = record
        self.heatmap = Heatmap(record.memory_bytes, record.disk_bytes)
        self.observe = self.heatmap.observe
        self._samples: collections.deque[tuple[float, int]] = collections.deque(maxlen=RATE_WINDOW + 1)
        self._stop = threading.Event()
        self.server: ThreadingHTTPServer | None = None
        self.error: str | None = None
        self._threads: list[threading.Thread] = []
        if port is not None:
            try:
                self.server = ThreadingHTTPServer((address, port), _handler(self))
            except OSError as exc:
                self.error = f"cannot serve the heatmap page on port {port}: {exc}"
            else:
                self.server.daemon_threads = True

    @property
    def port(self) -> int | None:
        return None if self.server is None else int(self.server.server_address[1])

    def start(self) -> HeatmapSession:
        if self.server is not None:
            t = threading.Thread(target=self.server.serve_forever, name="heatmap-http", daemon=True)
            t.start()
            self._threads.append(t)
        s = threading.Thread(target=self._sample, name="heatmap-rate", daemon=True)
        s.start()
        self._threads.append(s)
        return self

    def _sample(self) -> None:
        while True:
            self._samples.append((time.monotonic(), sum(self.record.wire.values())))
            if self._stop.wait(1.0):
                return

    # -- state -----------------------------------------------------------------------------------------
    def rate(self) -> float:
        """Wire bytes per second over the last RATE_WINDOW seconds; once finished, over the whole handoff."""
        r = self.record
        if r.finished is not None:
            return sum(r.wire.values()) / max(r.elapsed(), 1e-3)
        s = list(self._samples)
        if len(s) < 2 or s[-1][0] <= s[0][0]:
            return 0.0
        return (s[-1][1] - s[0][1]) / (s[-1][0] - s[0][0])

    def eta(self) -> float | None:
        """Seconds until every memory page was sent once (QEMU's first pre-copy pass sends each page,
        zero pages as ZERO records), from the share of pages seen so far; None before the first page and
        after the first pass (then the remaining time is QEMU's convergence, which nothing here predicts)."""
        m = self.heatmap.maps["memory"].summary()
        first = self.heatmap.first_block_at
        if first is None or self.record.status != "running" or not m["dirtied_blocks"]:
            return None
        share = min(m["dirtied_blocks"] / max(self.record.memory_bytes // BLOCK, 1), 1.0)
        if share >= 1.0:
            return None
        return (time.time() - first) * (1.0 - share) / share

    def state(self) -> dict[str, Any]:
        r = self.record
        d = r.to_dict()
        eta = self.eta()
        return {
            **d,
            "finished": r.finished is not None,
            "elapsed": f"{r.elapsed():.2f}",
            "wire_mib": f"{d['wire_total_bytes'] / MiB:.2f}",
            "rate_bps": round(self.rate(), 1),
            "eta_s": None if eta is None else round(eta, 1),
            "table_mib": {
                "memory": [_mib(v) for v in r.memory],
                "disk": [_mib(v) for v in r.disk],
            },
            "tile": TILE,
            "block": BLOCK,
            "maps": {k: self.heatmap.maps[k].summary() for k in KINDS},
            "now": time.time(),
        }

    # -- end -------------------------------------------------------------------------------------------
    def close(self, records: Records | None = None, linger: float = 0.0) -> list[Path]:
        """Keep the images beside the handoff's log, serve the final state ``linger`` more seconds, stop."""
        saved: list[Path] = []
        if records is not None:
            paths = image_paths(records.log_path)
            stem = paths["memory"].name.removeprefix("mem_").removesuffix(".png")
            try:
                saved = self.heatmap.save(records.log_path.parent, stem)
                records.log(f"heatmap images: {', '.join(p.name for p in saved)}")
            except OSError as exc:
                records.log(f"heatmap images not saved: {exc}")
        if self.server is not None and linger > 0:
            self._stop.wait(min(linger, MAX_LINGER))
        self._stop.set()
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
        for t in self._threads:
            t.join(5)
        return saved


def open_session(
    port: int | None, record: HandoffRecord, records: Records, address: str = ""
) -> HeatmapSession | None:
    """The hook dest.receive calls: a started session when the heatmap is on (port not None), else None.
    A port that cannot be opened does not stop the handoff: it is logged, and the images are still kept."""
    if port is None:
        return None
    s = HeatmapSession(record, address, port).start()
    if s.error:
        records.log(f"heatmap: {s.error}")
    else:
        records.log(f"heatmap page on port {s.port}: /heatmap/")
    return s


def _handler(session: HeatmapSession) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "nephele-heatmap"

        def log_message(self, format: str, *args: Any) -> None:
            pass  # a poll every second per viewer: not worth a log line

        def _send(self, code: int, ctype: str, body: bytes, cache: str = "no-store") -> None:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", cache)
            self.end_headers()
            if self.command != "HEAD":
                with contextlib.suppress(OSError):
                    self.wfile.write(body)

        def _redirect(self, where: str) -> None:
            self.send_response(HTTPStatus.MOVED_PERMANENTLY)
            self.send_header("Location", where)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def do_HEAD(self) -> None:
            self.do_GET()

        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            try:
                if path in ("/", "/heatmap"):
                    self._redirect("/heatmap/")
                elif path in ("/heatmap/", "/heatmap/index.html"):
                    self._send(200, "text/html; charset=utf-8", page())
                elif path == "/heatmap/state.json":
                    body = json.dumps(session.state(), sort_keys=True).encode()
                    self._send(200, "application/json", body)
                elif path == "/heatmap/stats.txt":
                    self._send(200, "text/plain; charset=utf-8", session.record.render().encode())
                elif path in ("/heatmap/memory.png", "/heatmap/disk.png"):
                    kind = path.rsplit("/", 1)[1].removesuffix(".png")
                    self._send(200, "image/png", session.heatmap.maps[kind].png())
                elif m := _TILE_PATH.match(path):
                    kind, level, tx, ty = m.group(1), int(m.group(2)), int(m.group(3)), int(m.group(4))
                    png = session.heatmap.maps[kind].tile(level, tx, ty)
                    # the page asks with ?v=<map version>: a tile at one version never changes
                    self._send(200, "image/png", png, "max-age=3600" if "?v=" in self.path else "no-store")
                else:
                    self._send(404, "text/plain", b"not found\n")
            except InvalidInput as exc:
                self._send(404, "text/plain", f"{exc}\n".encode())

    return Handler
