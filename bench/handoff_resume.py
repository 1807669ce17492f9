"""Resumable handoffs: what a retry after a link cut sends, with and without the destination's kept pages.

A private two-node cloudlet (tbf link at --rate Mbit/s, 20 ms each way), the test guest (256 MiB, booted
cold from its image's disk so its RAM, 32 MiB of random fill among it, is not what the image's memory
state holds). In one run:

  fresh          A -> B, resume off: what a whole handoff of this guest sends
  back           B -> A, resume off
  cut            A -> B, resume off, link cut once --cut of the fresh handoff's channel bytes were sent
  retry (no)     A -> B, resume off: starts over
  back           B -> A, resume off
  cut            A -> B, resume on: the destination keeps the pages it verified
  retry (resume) A -> B, resume on: those pages go as hash-only references

Every successful move checks the guest's RAM md5 and counter. "memory" is the memory channel's bytes
(source -> destination), "channels" adds the disk mirror and libvirt's control channel, "link" is what
both nodes' links carried (tbf counters: both directions, agent SSH calls included).

    python bench/handoff_resume.py [--rate 20] [--cut 0.6]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from nephele.cloudlet import Cloudlet
from nephele.cloudlet.guest import ensure_guest
from tests.handoff.cloudlet_setup import agent, build_image
from tests.handoff.test_resume_cloudlet import (
    MEM_MIB,
    cut_attempt,
    handoff,
    intact,
    resume_dir,
    start_cold,
)

MB = 1e6


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rate", type=float, default=20.0, help="link rate, Mbit/s")
    ap.add_argument("--cut", type=float, default=0.6, help="cut after this share of a fresh handoff's stream")
    a = ap.parse_args()
    c = Cloudlet.up("hresume", 2, rate_mbit=a.rate, delay_ms=20, workdir=Path("/tmp/nephele-bench-resume"))
    rows: list[tuple[str, dict[str, Any]]] = []
    try:
        A, B = c.nodes[:2]
        print("building the image ...", flush=True)
        cid = build_image(c, ensure_guest(), mem_mib=MEM_MIB)
        for n in (A, B):
            agent(n).call("handoff.warm", {"image": cid})
        inst, before = start_cold(c, cid, "rs-bench")
        uuid = inst["uuid"]

        def step(name: str, r: dict[str, Any], node: Any) -> dict[str, Any]:
            if node is not None:
                intact(node, before)
            rows.append((name, r))
            print(f"  {name}: {r}", flush=True)
            return r

        fresh = step("fresh A->B", handoff(c, A, B, uuid, resume=False), B)
        step("back B->A (1)", handoff(c, B, A, uuid, resume=False), A)
        at = int(a.cut * fresh["stream"])
        step("cut A->B (resume off)", cut_attempt(c, A, B, uuid, at, resume=False), A)
        assert not resume_dir(B, uuid).exists()
        step("retry A->B, resume off", handoff(c, A, B, uuid, resume=False), B)
        step("back B->A (2)", handoff(c, B, A, uuid, resume=False), A)
        step("cut A->B (resume on)", cut_attempt(c, A, B, uuid, at, resume=True), A)
        kept = resume_dir(B, uuid)
        kept_bytes = sum(p.stat().st_blocks * 512 for p in kept.glob("*.raw"))
        print(f"  kept on B: {kept_bytes / MB:.1f} MB allocated in {kept}", flush=True)
        step("retry A->B, resume on", handoff(c, A, B, uuid, resume=True), B)
        assert not kept.exists(), "the kept pages outlived the successful handoff"
        after = step("back B->A (3)", handoff(c, B, A, uuid, resume=False), A)
    finally:
        c.down()
    print(f"\n{a.rate:g} Mbit/s, cut after {a.cut:.0%} of a fresh handoff's migration stream\n")
    head = ("run", "memory MB", "channels MB", "link MB", "time s", "downtime s", "by value", "offered")
    print(f"{head[0]:<24}" + "".join(f"{h:>12}" for h in head[1:]))
    for name, r in rows:
        if "memory_wire" in r:
            table = r.get("table") or [0, 0, 0, 0]
            offered = f"{r['offered_pages']} ({r['offer_bytes'] / MB:.2f} MB)" if r["offered_pages"] else "-"
            mem, chans, link = r["memory_wire"] / MB, r["channels_wire"] / MB, r["link"] / MB
            print(
                f"{name:<24}{mem:>12.1f}{chans:>12.1f}{link:>12.1f}"
                f"{r['seconds']:>12.1f}{r['downtime_s'] or 0:>12.2f}{table[1]:>12}{offered:>22}"
            )
        else:
            print(f"{name:<24}{'':>12}{r['wire_at_cut'] / MB:>12.1f}{r['link'] / MB:>12.1f}")
    by = dict(rows)
    no, yes = by["retry A->B, resume off"], by["retry A->B, resume on"]
    print(
        f"\nretry with resume / retry without: memory {yes['memory_wire'] / no['memory_wire']:.2f}x, "
        f"link {yes['link'] / no['link']:.2f}x, time {yes['seconds'] / no['seconds']:.2f}x"
    )
    near = (
        by["back B->A (2)"]["memory_wire"] + after["memory_wire"]
    ) / 2  # the guest's memory grows over time
    print(f"retry with resume / the fresh moves around it (mean): memory {yes['memory_wire'] / near:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
