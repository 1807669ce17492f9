"""What `nephele-client SRC handoff INSTANCE DEST` prints: the original's first line, progress while the
state moves (bytes, rate, ETA, iteration), then the destination's stats table."""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

from nephele.handoff.controller import AgentLike, HandoffResult, perform
from nephele.handoff.records import table
from nephele.model import NodeSpec

MiB = 1 << 20


def fmt_progress(ev: dict[str, Any]) -> str:
    eta = ev.get("eta_s")
    phase = "stop-and-copy" if ev.get("paused") else f"iteration {ev.get('iteration', 0)}"
    return (
        f"  {ev.get('elapsed', 0):6.1f} s  {phase:<14} stream {ev.get('stream_bytes', 0) / MiB:8.1f} MiB  "
        f"wire {ev.get('wire_bytes', 0) / MiB:7.1f} MiB  {ev.get('rate_bps', 0) * 8 / 1e6:6.1f} Mbit/s  "
        f"ETA {'-' if eta is None else f'{eta:.0f} s'}"
        + (f"  guest slowed {ev['throttle_pct']} %" if ev.get("throttle_pct") else "")
    )


def switchover_line(mem: dict[str, Any]) -> str:
    """What the switchover check (ramcheck.py) found: pages QEMU never resent after the guest wrote them."""
    if not mem.get("checked"):
        return "RAM check at switchover: not available (the instance's RAM is not in a memfd)"
    n = int(mem.get("corrected") or 0)
    if n == 0:
        return "RAM check at switchover: every page matched the source's memory"
    return f"RAM check at switchover: {n} stale page(s) QEMU had not resent were sent before resuming"


def render_result(res: HandoffResult) -> str:
    d = res.destination
    blocks = d.get("table_blocks", {})
    mem = tuple(blocks.get("memory", (0, 0, 0, 0)))
    disk = tuple(blocks.get("disk", (0, 0, 0, 0)))
    wire = d.get("wire_bytes", {})
    dt = d.get("downtime_s")
    lines = [
        f"Handoff completed: {res.instance['title']} [{res.instance['uuid']}] runs on {res.url}",
        f"Iterations: {d.get('iterations')}",
        f"Elapsed Time: {res.elapsed_s:.2f} s",
        f"VM Disk Size: {d.get('disk_bytes', 0) / MiB:.2f} MiB",
        f"VM Memory Size: {d.get('memory_bytes', 0) / MiB:.2f} MiB",
        f"Blobs Received: {d.get('blobs')}",
        f"Total MBytes Received over wire: {sum(wire.values()) / MiB:.2f} MiB "
        + "("
        + ", ".join(f"{k} {v / MiB:.2f}" for k, v in sorted(wire.items()))
        + ")",
        f"Downtime: {'-' if dt is None else f'{dt:.3f} s'}",
        switchover_line(res.source.get("memory") or {}),
        "",
        table(mem, disk),  # type: ignore[arg-type]
        "",
        f"Stats file on the destination: {d.get('stats_file')}",
    ]
    return "\n".join(lines)


def run_handoff(
    src: AgentLike,
    dst: AgentLike,
    instance: str,
    dest: NodeSpec,
    *,
    source_address: str,
    downtime_ms: int = 1000,
    out: TextIO | None = None,
    err: TextIO | None = None,
    heatmap: bool | int | None = None,
    bandwidth_mbit: float | None = None,
    timeout_s: float | None = None,
    auto_converge: bool = True,
) -> HandoffResult:
    o = out or sys.stdout
    e = err or sys.stderr
    tty = o.isatty()
    last = [0.0]

    def on_progress(ev: dict[str, Any]) -> None:
        kind = ev.get("event")
        if kind == "initiated":
            print(
                f"Handoff initiated for {ev['title']} [{ev['uuid']}] to the following destination: "
                f"{ev['url']}",
                file=o,
                flush=True,
            )
        elif kind == "progress" and ev.get("side") == "source":
            now = time.monotonic()
            if tty:
                print("\r" + fmt_progress(ev), end="", file=o, flush=True)
            elif now - last[0] >= 5 or ev.get("paused"):
                last[0] = now
                print(fmt_progress(ev), file=o, flush=True)
        elif kind == "ready" and ev.get("heatmap_port"):  # the destination serves the heatmap page
            print(f"Heatmap: http://{dest.address}:{ev['heatmap_port']}/heatmap/", file=o, flush=True)
        elif kind == "failed":
            print(("\n" if tty else "") + f"handoff failed: {ev.get('error')}", file=e, flush=True)

    def text(line: str) -> None:
        print(line, file=e, flush=True)

    res = perform(
        src,
        dst,
        instance,
        dest,
        on_progress,
        downtime_ms=downtime_ms,
        source_address=source_address,
        on_text=text,
        heatmap=heatmap,
        bandwidth_mbit=bandwidth_mbit,
        timeout_s=timeout_s,
        auto_converge=auto_converge,
    )
    if tty:
        print(file=o)
    print(render_result(res), file=o, flush=True)
    return res
