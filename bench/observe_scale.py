#!/usr/bin/env python3
"""How observation scales with the number of nodes: the controller asks 1, 4 and 8 nodes of a local
cloudlet (no VMs) for their state over SSH, all at once, and times it.

Every node sits behind a WAN link to the controller (--wan-delay-ms, default 20 ms each way: a delay proxy
in front of its sshd), as a cloudlet's sites do; the fan-out exists to overlap those round trips. With
--wan-delay-ms 0 the nodes are a few microseconds away and the run measures instead how 8 nodes' sshds
and the controller's SSH handshakes (one process, one GIL) share this machine's 2 CPUs.

Four timings per size, each the median of --repeat runs:
  first  a fresh SSH connection to every node, no agent daemon on them (the first `nephele plan` after
         15 idle minutes: each node starts `nephele agent serve`, which starts the daemon)
  cold   a fresh SSH connection to every node, then `observe` (what each `nephele plan` pays)
  warm   connections already open, `observe` only (what a long-running controller pays)
  serial connections open, the nodes asked one after another (what a fan-out saves)

The nodes answer through a resident agent: on an open connection, one op in a running process; on a new
one, a child forked by the node's agent daemon, reached with socat (docs/agent-protocol.md).
`--one-shot` measures the old way, one `nephele agent call` process per observe.

Then where the CPU goes, per round (first and cold: the mean of 3, warm: of 100, as a warm round takes
less than a clock tick): the controller's own CPU time (all its threads), and the nodes' (each node's sshd
with everything under it, its libvirtd, its agent daemon with its children), from /proc. The floor under
the parallel time of a size is the larger of the controller's CPU and the sum over this machine's CPUs.

Results and their reading: bench/README.md. Run of 27 Nov 00:41 UTC (2 CPUs, no VMs), 1 / 4 / 8 nodes,
20 ms each way: cold 329 / 379 / 422 ms (ratio 1.28), warm 44.3 / 46.2 / 49.1 ms (1.11), first contact 430
/ 657 / 970 ms (2.26: 8 Python start-ups on 2 CPUs); target met. Before the agent daemon (26 Nov 22:45):
cold 460 / 627 / 982 ms (2.14), warm 1.10.

Target (issue 6): 8 nodes within 2 x the time of 1 (parallel fan-out, not one node after another), for
cold and warm observations. Needs root (network namespaces, libvirtd, sshd per node), like the
integration tests.

    python bench/observe_scale.py [--sizes 1,4,8] [--repeat 5] [--wan-delay-ms 20] [--one-shot]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import resource
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from nephele.agent.daemon import socket_path
from nephele.agent.nodes import transport_for_node
from nephele.agent.ssh import DEFAULT_SERVE_COMMAND, SSHTransport
from nephele.cloudlet import Cloudlet, reap_orphans
from nephele.model import Desired
from nephele.reconcile.observe import TransportPool, observe

WORKDIR = Path(tempfile.gettempdir()) / "nephele-bench-cloudlets"


PROXY_PORT = 2222  # where a node's delay proxy in front of its sshd listens (--wan-delay-ms)


def desired_for(c: Cloudlet, n: int, wan_delay_ms: float = 0) -> Desired:
    specs = c.node_specs()[:n]
    if wan_delay_ms:  # through each node's delay proxy
        specs = [dataclasses.replace(s, ssh_port=PROXY_PORT) for s in specs]
    return Desired(name="bench", nodes={s.name: s for s in specs}, images={}, snapshots={}, instances={})


def desired_one(d: Desired, name: str) -> Desired:
    return Desired(name=d.name, nodes={name: d.nodes[name]}, images={}, snapshots={}, instances={})


def wan_links(c: Cloudlet, delay_ms: float) -> Path:
    """Put a delay proxy (delay_ms each way) in front of every node's sshd, as the WAN between a controller
    and its sites; returns a known_hosts that also names each node's host key at the proxy's port."""
    kh = c.dir / "known_hosts-wan"
    lines = c.known_hosts.read_text().splitlines()
    for node in c.nodes:
        c.start_delay_proxy(node, PROXY_PORT, (node.address, node.ssh_port), delay_ms=delay_ms)
        key = next(ln.split(" ", 1)[1] for ln in lines if ln.split(" ", 1)[0] == node.address)
        lines.append(f"[{node.address}]:{PROXY_PORT} {key}")
    kh.write_text("\n".join(lines) + "\n")
    return kh


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
    """CPU seconds the nodes have used so far: their sshds with everything under them (the
    per-connection sshd's crypto, each session's shell and agent), and their libvirtds (which answer
    the agents' domain listings)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for n in names:
        node = c.node(n)
        for pidfile in (node.sshd_pidfile, node.libvirtd_pidfile, daemon_lock(node)):
            with contextlib.suppress(OSError, ValueError):  # no agent daemon (yet)
                total += _tree_cpu(int(pidfile.read_text().split()[0]), tick)
    return total


def daemon_lock(node: Any) -> Path:
    """The node's agent daemon's lock file, which names its pid."""
    return Path(socket_path(node.host_root) + ".lock")


def stop_daemons(c: Cloudlet, names: list[str], timeout: float = 10.0) -> None:
    """End the nodes' agent daemons (SIGTERM), as 15 idle minutes would: the next connection to each
    node is a first contact again, its own `serve` starting a new daemon."""
    pids = []
    for n in names:
        with contextlib.suppress(OSError, ValueError):
            pid = int(daemon_lock(c.node(n)).read_text().split()[0])
            os.kill(pid, signal.SIGTERM)
            pids.append(pid)
    deadline = time.monotonic() + timeout
    while any(Path(f"/proc/{p}").exists() for p in pids):
        if time.monotonic() > deadline:
            raise SystemExit(f"agent daemons {pids} did not end within {timeout:g} s")
        time.sleep(0.02)


def wait_daemons(c: Cloudlet, names: list[str], timeout: float = 10.0) -> None:
    """Wait until every node's agent daemon listens (started in the background by a first contact)."""
    deadline = time.monotonic() + timeout
    while not all(Path(socket_path(c.node(n).host_root)).is_socket() for n in names):
        if time.monotonic() > deadline:
            raise SystemExit(f"the nodes' agent daemons did not start within {timeout:g} s")
        time.sleep(0.02)


def settle(c: Cloudlet, names: list[str], timeout: float = 10.0) -> None:
    """Wait until the nodes' sshds have no sessions left: a closed connection's resident agent ends just
    after its sshd, is reparented, and its CPU time would leave the tree in the middle of a round."""
    pids = [int(c.node(n).sshd_pidfile.read_text().split()[0]) for n in names]
    deadline = time.monotonic() + timeout
    while any(Path(f"/proc/{p}/task/{p}/children").read_text().split() for p in pids):
        if time.monotonic() > deadline:
            raise SystemExit(f"the nodes' SSH sessions did not end within {timeout:g} s")
        time.sleep(0.05)


def cpu_round(
    c: Cloudlet, d: Desired, factory: Any, *, cold: bool, rounds: int, pause: float, first: bool = False
) -> tuple[float, float]:
    """(controller CPU s, the nodes' CPU s) of one round, the mean of `rounds`: cold (fresh connections
    each; with `first`, no agent daemon either) or warm (one pool, connections open). CPU time is
    counted in clock ticks (10 ms), so a warm round of a few ms needs many."""
    names = list(d.nodes)
    ctl = nodes = 0.0
    pool = TransportPool(d, factory)
    if not cold:
        timed_observe(d, pool)  # connections open
    for _ in range(rounds):
        if cold:
            pool.close()
            settle(c, names)
            if first:
                stop_daemons(c, names)
            pool = TransportPool(d, factory)
        n0, t0 = node_cpu(c, names), cpu_seconds()
        timed_observe(d, pool)
        ctl += cpu_seconds() - t0
        time.sleep(pause)  # a one-shot session's processes are reaped just after its answer
        nodes += node_cpu(c, names) - n0
    pool.close()
    settle(c, names)
    return ctl / rounds, nodes / rounds


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1,4,8", help="node counts (default 1,4,8)")
    ap.add_argument("--repeat", type=int, default=5, help="runs per size and mode (median reported)")
    ap.add_argument(
        "--wan-delay-ms",
        type=float,
        default=20,
        metavar="MS",
        help="reach every node's sshd through a delay proxy adding MS each way (the controller-to-site "
        "WAN; default 20; 0: the nodes' and the controller's CPU, shared on this machine, bound the time)",
    )
    ap.add_argument(
        "--one-shot",
        action="store_true",
        help="one `nephele agent call` process per observe, no resident agent (how it was before)",
    )
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
    cpu: dict[str, dict[int, tuple[float, float]]] = {"first": {}, "cold": {}, "warm": {}}
    firsts: dict[int, float | None] = {}
    serve_command = None if args.one_shot else DEFAULT_SERVE_COMMAND
    try:
        known_hosts = wan_links(c, args.wan_delay_ms) if args.wan_delay_ms else c.nodes[0].known_hosts

        def factory(spec):  # type: ignore[no-untyped-def]
            t = transport_for_node(spec, known_hosts=str(known_hosts), timeout=60)
            assert isinstance(t, SSHTransport)
            t.serve_command = serve_command
            return t

        # One untimed round so every node's disk cache holds the agent's code (first runs read it).
        warmup = TransportPool(desired_for(c, max(sizes), args.wan_delay_ms), factory)
        timed_observe(desired_for(c, max(sizes), args.wan_delay_ms), warmup)
        warmup.close()
        for n in sizes:
            d = desired_for(c, n, args.wan_delay_ms)
            first, cold, warm, serial = [], [], [], []
            # A warm observe with a resident agent takes milliseconds: the median of `inner` of them.
            inner = 1 if args.one_shot else 20
            for _ in range(args.repeat):
                if not args.one_shot:
                    stop_daemons(c, list(d.nodes))
                    pool = TransportPool(d, factory)
                    first.append(timed_observe(d, pool))
                    pool.close()
                    settle(c, list(d.nodes))
                    wait_daemons(c, list(d.nodes))
                pool = TransportPool(d, factory)
                cold.append(timed_observe(d, pool))
                warm.append(statistics.median(timed_observe(d, pool) for _ in range(inner)))
                serial.append(
                    statistics.median(
                        sum(timed_observe(desired_one(d, name), pool) for name in d.nodes)
                        for _ in range(inner)
                    )
                )
                pool.close()
            rows.append((n, statistics.median(cold), statistics.median(warm), statistics.median(serial)))
            firsts[n] = statistics.median(first) if first else None
            if not args.one_shot:
                cpu["first"][n] = cpu_round(c, d, factory, cold=True, rounds=3, pause=0.3, first=True)
                wait_daemons(c, list(d.nodes))
            cpu["cold"][n] = cpu_round(c, d, factory, cold=True, rounds=3, pause=0.2)
            if args.one_shot:
                cpu["warm"][n] = cpu_round(c, d, factory, cold=False, rounds=3, pause=0.2)
            else:
                cpu["warm"][n] = cpu_round(c, d, factory, cold=False, rounds=100, pause=0)
    finally:
        c.down()
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    agent = (
        "one `nephele agent call` per observe" if args.one_shot else "resident agent (`nephele agent serve`)"
    )
    print(
        f"cloudlet of {max(sizes)} nodes up in {up_s:.1f} s; {os.cpu_count()} CPU(s), load {load}; "
        f"median of {args.repeat}; {agent}; "
        + (
            f"{args.wan_delay_ms:g} ms each way to every node (delay proxies)"
            if args.wan_delay_ms
            else "no WAN delay"
        )
    )
    print()
    print(
        f"{'nodes':>5}  {'first contact':>13}  {'cold (connect+observe)':>22}  {'warm (observe)':>14}  "
        f"{'serial (one by one)':>19}"
    )
    for n, cold_s, warm_s, serial_s in rows:
        f = firsts.get(n)
        print(
            f"{n:>5}  {'-' if f is None else f'{f * 1e3:.1f} ms':>13}  {cold_s * 1e3:>19.1f} ms  "
            f"{warm_s * 1e3:>11.1f} ms  {serial_s * 1e3:>16.1f} ms"
        )
    print()
    print(
        f"{'round':>5}  {'nodes':>5}  {'controller CPU':>14}  {'nodes CPU':>10}  "
        f"{'per node':>9}  {'CPU floor':>10}"
    )
    ncpu = os.cpu_count() or 1
    floors: dict[str, dict[int, float]] = {"first": {}, "cold": {}, "warm": {}}
    for mode in ("first", "cold", "warm"):
        for n, (ctl, nodes_cpu) in sorted(cpu[mode].items()):
            # The controller's own part runs mostly under one GIL: it does not spread over the CPUs.
            floor = floors[mode][n] = max(ctl, (ctl + nodes_cpu) / min(ncpu, n + 1))
            print(
                f"{mode:>5}  {n:>5}  {ctl * 1e3:>11.1f} ms  {nodes_cpu * 1e3:>7.1f} ms  "
                f"{nodes_cpu / n * 1e3:>6.2f} ms  {floor * 1e3:>7.1f} ms"
            )
    base = {r[0]: r for r in rows}
    lo, hi = min(sizes), max(sizes)
    cold_ratio = base[hi][1] / base[lo][1]
    warm_ratio = base[hi][2] / base[lo][2]
    first_lo, first_hi = firsts.get(lo), firsts.get(hi)
    print()
    print(
        f"ratio {hi} nodes / {lo} node: cold {cold_ratio:.2f}, warm {warm_ratio:.2f} (target <= 2)"
        + (f"; first contact {first_hi / first_lo:.2f}" if first_lo and first_hi else "")
    )
    print(f"fan-out speed-up at {hi} nodes: serial / warm = {base[hi][3] / base[hi][2]:.2f}")
    # The CPU the nodes and the controller need for `hi` nodes, spread over this machine's CPUs, against
    # the time of `lo`: above 2, no fan-out can meet the target here (real nodes bring their own CPUs).
    print(
        f"CPU floor at {hi} nodes / time of {lo}: cold {floors['cold'][hi] / base[lo][1]:.2f}, "
        f"warm {floors['warm'][hi] / base[lo][2]:.2f}"
    )
    ok = cold_ratio <= 2 and warm_ratio <= 2
    print("target met" if ok else "target NOT met")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
