#!/usr/bin/env python3
"""How observation scales with the number of nodes: the controller asks 1, 4 and 8 nodes of a local
cloudlet (no VMs) for their state over SSH, all at once, and times it.

Three timings per size, each the median of --repeat runs:
  cold   a fresh SSH connection to every node, then `observe` (what one `nephele plan` pays)
  warm   connections already open, `observe` only (what a long-running controller pays)
  serial connections open, the nodes asked one after another (what a fan-out saves)

All nodes of a local cloudlet share this machine's CPUs: each `observe` starts a Python agent on its
node, so with more nodes than cores the agents' own start-up CPU time, not the controller, bounds the
parallel time. The header prints the CPU count and load so the figures can be read in that light.

A fourth round per size says where the CPU goes: the controller's own CPU time (all its threads), and
the nodes' (each node's sshd session, shell and agent: the cumulative child CPU time of its sshd in
/proc). Their sum over the machine's CPUs is a floor under the parallel time of that size.

Target (issue 6): 8 nodes within 2 x the time of 1 (parallel fan-out, not one node after another).
Needs root (network namespaces, libvirtd, sshd per node), like the integration tests.

    python bench/observe_scale.py [--sizes 1,4,8] [--repeat 5]
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

from nephele.agent.nodes import transport_for_node
from nephele.cloudlet import Cloudlet, reap_orphans
from nephele.model import Desired
from nephele.reconcile.observe import TransportPool, observe

WORKDIR = Path(tempfile.gettempdir()) / "nephele-bench-cloudlets"


def desired_for(c: Cloudlet, n: int) -> Desired:
    specs = c.node_specs()[:n]
    return Desired(name="bench", nodes={s.name: s for s in specs}, images={}, snapshots={}, instances={})


def desired_one(d: Desired, name: str) -> Desired:
    return Desired(name=d.name, nodes={name: d.nodes[name]}, images={}, snapshots={}, instances={})


def timed_observe(d: Desired, pool: TransportPool) -> float:
    t0 = time.perf_counter()
    obs = observe(d, pool, timeout=60)
    elapsed = time.perf_counter() - t0
    dark = [n for n, o in obs.nodes.items() if not o.reachable]
    if dark:
        raise SystemExit(f"nodes did not answer: {', '.join(f'{n}: {obs.nodes[n].error}' for n in dark)}")
    return elapsed


def cpu_seconds() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def _tree_cpu(pid: int, tick: int) -> float:
    """CPU seconds of a process tree: each live process's own time plus what it reaped (cutime), so a
    session that ended counts once, in its parent."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:  # it ended meanwhile: its time is in its parent's cutime from now on
        return 0.0
    own = sum(int(f) for f in fields[11:15]) / tick  # utime, stime, cutime, cstime
    return own + sum(_tree_cpu(int(k), tick) for k in kids)


def node_cpu(c: Cloudlet, names: list[str]) -> float:
    """CPU seconds the nodes' sshds have used so far, with everything under them: the per-connection
    sshd (crypto), each session's shell and agent."""
    tick = os.sysconf("SC_CLK_TCK")
    return sum(_tree_cpu(int(c.node(n).sshd_pidfile.read_text().split()[0]), tick) for n in names)


def cpu_round(c: Cloudlet, d: Desired, pool: TransportPool) -> tuple[float, float]:
    """(controller CPU s, the nodes' CPU s: sshd sessions and agents) of one warm round."""
    timed_observe(d, pool)  # connections open
    names = list(d.nodes)
    n0, t0 = node_cpu(c, names), cpu_seconds()
    timed_observe(d, pool)
    controller = cpu_seconds() - t0
    time.sleep(0.2)  # the sessions' processes are reaped just after their answers
    return controller, node_cpu(c, names) - n0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1,4,8", help="node counts (default 1,4,8)")
    ap.add_argument("--repeat", type=int, default=5, help="runs per size and mode (median reported)")
    args = ap.parse_args()
    sizes = sorted({int(x) for x in args.sizes.split(",")})
    if os.geteuid() != 0:
        print("observe_scale: needs root (it starts a local cloudlet)", file=sys.stderr)
        return 1
    reap_orphans(WORKDIR)
    t0 = time.perf_counter()
    c = Cloudlet.up(f"ob{os.getpid() % 100000}", max(sizes), rate_mbit=1000, delay_ms=0, workdir=WORKDIR)
    up_s = time.perf_counter() - t0
    rows: list[tuple[int, float, float, float]] = []
    cpu: dict[int, tuple[float, float]] = {}
    try:

        def factory(spec):  # type: ignore[no-untyped-def]
            return transport_for_node(spec, known_hosts=str(c.nodes[0].known_hosts), timeout=60)

        # One untimed round so every node's disk cache holds the agent's code (first runs read it).
        timed_observe(desired_for(c, max(sizes)), TransportPool(desired_for(c, max(sizes)), factory))
        for n in sizes:
            d = desired_for(c, n)
            cold, warm, serial = [], [], []
            for _ in range(args.repeat):
                pool = TransportPool(d, factory)
                cold.append(timed_observe(d, pool))
                warm.append(timed_observe(d, pool))
                serial.append(sum(timed_observe(desired_one(d, name), pool) for name in d.nodes))
                pool.close()
            rows.append((n, statistics.median(cold), statistics.median(warm), statistics.median(serial)))
            pool = TransportPool(d, factory)
            cpu[n] = cpu_round(c, d, pool)
            pool.close()
    finally:
        c.down()
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(
        f"cloudlet of {max(sizes)} nodes up in {up_s:.1f} s; {os.cpu_count()} CPU(s), load {load}; "
        f"median of {args.repeat}"
    )
    print()
    print(
        f"{'nodes':>5}  {'cold (connect+observe)':>22}  {'warm (observe)':>14}  {'serial (one by one)':>19}"
    )
    for n, cold_s, warm_s, serial_s in rows:
        print(f"{n:>5}  {cold_s:>20.3f} s  {warm_s:>12.3f} s  {serial_s:>17.3f} s")
    print()
    print(f"{'nodes':>5}  {'controller CPU':>14}  {'nodes CPU':>9}  {'per node':>8}  {'CPU floor':>9}")
    ncpu = os.cpu_count() or 1
    for n, (ctl, nodes_cpu) in sorted(cpu.items()):
        floor = (ctl + nodes_cpu) / min(ncpu, n + 1)
        print(f"{n:>5}  {ctl:>12.3f} s  {nodes_cpu:>7.3f} s  {nodes_cpu / n:>6.3f} s  {floor:>7.3f} s")
    base = {r[0]: r for r in rows}
    lo, hi = min(sizes), max(sizes)
    cold_ratio = base[hi][1] / base[lo][1]
    warm_ratio = base[hi][2] / base[lo][2]
    print()
    print(f"ratio {hi} nodes / {lo} node: cold {cold_ratio:.2f}, warm {warm_ratio:.2f} (target <= 2)")
    print(f"fan-out speed-up at {hi} nodes: serial / warm = {base[hi][3] / base[hi][2]:.2f}")
    ok = cold_ratio <= 2 and warm_ratio <= 2
    print("target met" if ok else "target NOT met")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
