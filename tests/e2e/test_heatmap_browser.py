"""The heatmap page in a real browser during a real handoff: a guest is handed off between two cloudlet
nodes with the page on; headless Chromium (Debian's) loads http://NODE:PORT/heatmap/ on the destination
node's address twice while the state moves and the memory map must have changed between the two
screenshots; after the end, the page's stats must say exactly what the handoff's own .stats record says,
and the images kept with the log must hold what the page showed.

Set NEPHELE_HEATMAP_SHOTS=DIR to keep the screenshots (docs/img/heatmap.png is one of them)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from nephele.cli.main import main
from nephele.cloudlet import Cloudlet
from nephele.cloudlet.guest import GuestFiles
from nephele.handoff import perform
from nephele.node import history
from tests.conftest import require
from tests.handoff.cloudlet_setup import agent, build_image, running_instance, spec, wait_guest
from tests.handoff.test_heatmap import decode_png

pytestmark = pytest.mark.integration
CHROMIUM = "/usr/bin/chromium"
PORT = 18081
LINK_MBIT = float(os.environ.get("NEPHELE_HEATMAP_LINK_MBIT", "4"))
LINGER = 40.0  # the page stays up this long after the end, for the final check
WINDOW = (1280, 900)
OUTLINE = np.array([0x33, 0xAA, 0x66])  # the viewer's frame around each map


@pytest.fixture(scope="module")
def image(cloudlet: Cloudlet, guest: GuestFiles) -> str:
    return build_image(cloudlet, guest)


@pytest.fixture
def instance(cloudlet: Cloudlet, image: str) -> Iterator[dict[str, Any]]:
    with running_instance(cloudlet, image, "heat-1", PORT) as r:
        yield r


def chromium(url: str, profile: Path, *, screenshot: Path | None = None) -> str:
    """One headless Chromium run: a screenshot, or the DOM after the page's script ran (--dump-dom)."""
    profile.mkdir(parents=True, exist_ok=True)
    cmd = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        f"--window-size={WINDOW[0]},{WINDOW[1]}",
        "--virtual-time-budget=4000",  # let the page poll state.json and draw its tiles first
        f"--screenshot={screenshot}" if screenshot else "--dump-dom",
        url,
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-2000:]
    if screenshot is not None:
        assert screenshot.is_file(), r.stderr[-2000:]
    return r.stdout


def state(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url + "state.json", timeout=10) as r:
        out: dict[str, Any] = json.loads(r.read())
        return out


def map_boxes(shot: np.ndarray) -> list[tuple[int, int, int, int]]:
    """The two maps' frames in a screenshot (memory above disk) as (y0, y1, x0, x1) interiors."""
    rgb = shot[:, :, :3].astype(int)
    mask = np.abs(rgb - OUTLINE).max(axis=2) <= 24
    ys = np.flatnonzero(mask.any(axis=1))
    assert ys.size, "no map frame in the screenshot: the page did not draw"
    groups = np.split(ys, np.flatnonzero(np.diff(ys) > 1) + 1)
    # each frame is two horizontal lines joined by vertical ones: one run of rows per frame
    boxes = []
    for g in groups:
        if g.size < 20:
            continue
        cols = np.flatnonzero(mask[g[0] : g[-1] + 1].any(axis=0))
        boxes.append((int(g[0]) + 1, int(g[-1]), int(cols[0]) + 1, int(cols[-1])))
    assert len(boxes) == 2, f"expected 2 map frames, found {boxes}"
    return boxes


def dom_value(dom: str, ident: str) -> str:
    m = re.search(rf'id="{re.escape(ident)}"[^>]*>([^<]*)<', dom)
    assert m is not None, f"#{ident} not in the page"
    return m.group(1).strip()


def test_heatmap_page_shows_a_real_handoff(
    cloudlet: Cloudlet, instance: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    require(files=(CHROMIUM,))
    shots = Path(os.environ.get("NEPHELE_HEATMAP_SHOTS") or tmp_path)
    shots.mkdir(parents=True, exist_ok=True)
    a, b = cloudlet.nodes[:2]
    before = wait_guest(a, PORT)
    out: dict[str, Any] = {}
    events: list[dict[str, Any]] = []

    def run() -> None:
        try:
            out["r"] = perform(
                agent(a),
                agent(b),
                "heat-1",
                spec(b),
                events.append,
                source_address=a.address,
                heatmap=0,  # any free port: the ready event says which
                heatmap_linger=LINGER,
                # the page, not the downtime, is under test: a roomier budget converges sooner at 4 Mbit/s
                downtime_ms=2000,
            )
        except BaseException as e:
            out["e"] = e

    cloudlet.set_link(LINK_MBIT)
    t = threading.Thread(target=run, daemon=True)
    try:
        t.start()
        deadline = time.monotonic() + 300
        while not any(e.get("event") == "ready" for e in events):
            assert t.is_alive(), out
            assert time.monotonic() < deadline, "the destination never got ready"
            time.sleep(0.2)
        (ready,) = [e for e in events if e.get("event") == "ready"]
        port = ready["heatmap_port"]
        assert isinstance(port, int) and port > 0, ready
        url = f"http://{b.address}:{port}/heatmap/"

        # first screenshot once memory pages arrive, the second when many more have
        while state(url)["maps"]["memory"]["writes"] == 0:
            assert t.is_alive() and time.monotonic() < deadline, out
            time.sleep(0.2)
        shot1 = shots / "heatmap-1.png"
        chromium(url, tmp_path / "p1", screenshot=shot1)
        s1 = state(url)
        assert not s1["finished"], "the handoff ended before the first screenshot: slow the link down"
        while state(url)["maps"]["memory"]["dirtied_blocks"] < s1["maps"]["memory"]["dirtied_blocks"] + 2000:
            assert t.is_alive() and time.monotonic() < deadline, out
            assert not state(url)["finished"], "the handoff ended before the second screenshot"
            time.sleep(0.5)
        shot2 = shots / "heatmap-2.png"
        chromium(url, tmp_path / "p2", screenshot=shot2)
        s2 = state(url)
        assert not s2["finished"], "the handoff ended during the second screenshot: slow the link down"

        img1, img2 = decode_png(shot1.read_bytes()), decode_png(shot2.read_bytes())
        assert img1.shape[:2] == (WINDOW[1], WINDOW[0])
        boxes1, boxes2 = map_boxes(img1), map_boxes(img2)
        # the same layout (to a pixel of anti-aliasing), so the same pixels show the same blocks
        diff = np.abs(np.array(boxes1) - np.array(boxes2))
        assert diff.max() <= 2, (boxes1, boxes2)
        (a0, a1, a2, a3), (b0, b1, b2, b3) = boxes1[0], boxes2[0]
        y0, y1, x0, x1 = max(a0, b0) + 2, min(a1, b1) - 2, max(a2, b2) + 2, min(a3, b3) - 2
        m1, m2 = img1[y0:y1, x0:x1, 0].astype(int), img2[y0:y1, x0:x1, 0].astype(int)
        assert (m1 > 0).any(), "the memory map showed nothing in the first screenshot"
        assert int((m2 > 0).sum()) > int((m1 > 0).sum()), "the memory map did not grow"
        assert m2.sum() > m1.sum() and not np.array_equal(m1, m2)
        assert (m2 < m1).mean() < 0.01  # counters only go up: pixels do not get darker

        # the end: during the linger the page shows the final record
        while not state(url)["finished"]:
            assert time.monotonic() < deadline + 300, "the handoff did not end"
            time.sleep(0.5)
        final = state(url)
        dom = chromium(url, tmp_path / "p3")
        chromium(url, tmp_path / "p4", screenshot=shots / "heatmap-final.png")
        t.join(LINGER + 120)
        assert not t.is_alive()
    finally:
        cloudlet.set_link(20)
    assert "e" not in out, out.get("e")
    res = out["r"]

    stats = b.host_root / "logs" / os.path.basename(res.destination["stats_file"])
    rec = history.read_entry(stats)
    assert rec["outcome"] == "completed"
    shown = {k: dom_value(dom, f"st-{k}") for k in ("status", "iterations", "elapsed", "wire", "blobs")}
    assert shown == {
        "status": "completed",
        "iterations": str(rec["iterations"]),
        "elapsed": f"{rec['duration_s']:.2f}",
        "wire": f"{rec['wire_mib']:.2f}",
        "blobs": str(rec["blobs"]),
    }
    assert dom_value(dom, "st-downtime") == f"{rec['downtime_s']:.3f} s"
    for kind in ("memory", "disk"):
        row = [dom_value(dom, f"tb-{kind}-{i}") for i in range(4)]
        assert row == [f"{rec['table_mib'][kind][c]:.2f}" for c in history.COLUMNS], kind
    assert "finished (completed)" in dom_value(dom, "status")

    # the images kept with the log hold what the page showed at the end
    mem = decode_png(Path(rec["images"]["memory"]).read_bytes())
    disk = decode_png(Path(rec["images"]["disk"]).read_bytes())
    fm, fd = final["maps"]["memory"], final["maps"]["disk"]
    assert mem.shape == (fm["height"], fm["width"]) and disk.shape == (fd["height"], fd["width"])
    assert int((mem > 0).sum()) == fm["dirtied_blocks"] > 0
    assert int((disk > 0).sum()) == fd["dirtied_blocks"]
    # the maps count every block the destination received; the table leaves out KEEP blocks (content
    # the destination already had there), so it can only be smaller
    assert fm["writes"] >= final["table_blocks"]["memory"][0] > 0
    assert fd["writes"] >= final["table_blocks"]["disk"][0]
    (entry,) = [e for e in agent(b).call("handoff.history")["handoffs"] if e["uuid"] == instance["uuid"]]
    assert entry["outcome"] == "completed" and set(entry["images"]) == {"memory", "disk"}
    # and `nephele handoffs` over SSH lists it, with the source shown by its node name
    capsys.readouterr()
    assert main(["handoffs", "--cloudlet", cloudlet.name, "-o", "json"]) == 0
    listed = [e for e in json.loads(capsys.readouterr().out) if e["uuid"] == instance["uuid"]]
    assert [(e["from_node"], e["to"], e["outcome"]) for e in listed] == [(a.name, b.name, "completed")]
    assert listed[0]["wire_bytes"] == round(rec["wire_mib"] * (1 << 20))
    # the guest made it (its checksum CGI hashes 32 MiB under TCG: slow on a loaded machine)
    assert wait_guest(b, PORT, timeout=240)["fill_md5"] == before["fill_md5"]
    if os.environ.get("NEPHELE_HEATMAP_SHOTS"):
        shutil.copy(shots / "heatmap-2.png", shots / "heatmap.png")
