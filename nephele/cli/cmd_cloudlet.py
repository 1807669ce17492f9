"""`nephele cloudlet up|down|status|link|proxy|guest`: a local multi-node cloudlet on this machine (like
`kind`), for trying nephele on a laptop, the demo and the integration tests. See docs/cloudlet.md."""

from __future__ import annotations

import argparse
import json
import shlex
import signal
import sys
import time
from pathlib import Path
from typing import Any

from nephele.cloudlet import Cloudlet, default_workdir, parse_delay_ms, parse_rate_mbit, teardown
from nephele.cloudlet.delayproxy import parse_hostport
from nephele.cloudlet.guest import default_cache_dir, ensure_guest
from nephele.errors import CloudletError


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "cloudlet", help="a local multi-node cloudlet on this machine (up, down, status)"
    )
    sub = p.add_subparsers(dest="cloudlet_command", required=True, metavar="ACTION")

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--name", default="demo", help="cloudlet name (default demo)")
        sp.add_argument(
            "--workdir", type=Path, default=None, help=f"state directory (default {default_workdir()})"
        )

    up = sub.add_parser("up", help="create the cloudlet (removing stale leftovers of the same name first)")
    common(up)
    up.add_argument("--nodes", type=int, default=2, help="number of nodes (default 2)")
    up.add_argument(
        "--rate", default="20mbit", help="link rate of every node, each direction (default 20mbit)"
    )
    up.add_argument("--delay", default="20ms", help="one-way delay used by delay proxies (default 20ms)")
    up.add_argument(
        "--subnet", default=None, help="IPv4 subnet of the nodes (default: first free 10.201.X.0/24)"
    )
    up.add_argument("--guest", action="store_true", help="also build (or find cached) the test guest")
    up.set_defaults(func=cmd_up)

    down = sub.add_parser("down", help="remove everything `up` made")
    common(down)
    down.add_argument("--keep", action="store_true", help="keep the state directory (logs, node roots)")
    down.set_defaults(func=cmd_down)

    st = sub.add_parser("status", help="show each node: netns, libvirtd, sshd, running VMs")
    common(st)
    st.add_argument("-o", "--output", choices=["table", "json"], default="table")
    st.set_defaults(func=cmd_status)

    link = sub.add_parser("link", help="change a node's link: rate, or cut / restore it")
    common(link)
    link.add_argument("--node", default=None, help="only this node (default: every node)")
    g = link.add_mutually_exclusive_group(required=True)
    g.add_argument("--rate", help="new tbf rate, e.g. 5mbit")
    g.add_argument("--cut", action="store_true", help="take the link down")
    g.add_argument("--restore", action="store_true", help="bring the link back up")
    link.set_defaults(func=cmd_link)

    px = sub.add_parser("proxy", help="run a TCP delay proxy inside a node (foreground, Ctrl-C stops it)")
    common(px)
    px.add_argument("--node", required=True, help="node to run it in")
    px.add_argument("listen_port", type=int, help="port to accept on, at the node's address")
    px.add_argument("target", type=parse_hostport, help="HOST:PORT to forward to")
    px.add_argument("--delay", default=None, help="one-way delay (default: the cloudlet's)")
    px.set_defaults(func=cmd_proxy)

    gp = sub.add_parser("guest", help="build (or find cached) the test guest and print its files")
    gp.add_argument("--cache-dir", type=Path, default=None, help=f"default {default_cache_dir()}")
    gp.set_defaults(func=cmd_guest)


def cmd_up(args: argparse.Namespace) -> int:
    rate = parse_rate_mbit(args.rate)
    delay = parse_delay_ms(args.delay)
    if args.guest:
        g = ensure_guest()
        print(f"guest: {g.directory}")
    t0 = time.monotonic()
    c = Cloudlet.up(
        args.name, args.nodes, rate_mbit=rate, delay_ms=delay, workdir=args.workdir, subnet=args.subnet
    )
    print(
        f"cloudlet {c.name} up in {time.monotonic() - t0:.1f} s: {len(c.nodes)} nodes on {c.subnet}, ", end=""
    )
    print(f"links {c.rate_mbit:g} Mbit/s (delay proxies: {c.delay_ms:g} ms)")
    _print_table(c)
    print(f"\ninventory: {c.inventory_path}")
    print(f"manifest nodes: {c.dir / 'nodes.yaml'}")
    n = c.nodes[0]
    print(f"\n  ssh:   {shlex.join(n.ssh_command())}")
    print(f"  virsh: virsh -c '{n.libvirt_uri}' list --all")
    print(f"  shell: {shlex.join(n.nsenter())} bash")
    print(f"  down:  nephele cloudlet down --name {c.name}")
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    try:
        c: Cloudlet | None = Cloudlet.load(args.name, args.workdir)
    except CloudletError:
        c = None
    if c is not None:
        c.down(keep=args.keep)
        print(f"cloudlet {c.name} removed" + (f" (kept {c.dir})" if args.keep else ""))
        return 0
    # No readable inventory: still remove whatever a crashed run of that name left behind.
    base = args.workdir if args.workdir is not None else default_workdir()
    cdir = base / args.name
    removed = teardown(args.name, cdir if cdir.exists() else None, remove_dir=not args.keep)
    if removed:
        print(f"cloudlet {args.name}: removed leftovers: {', '.join(removed)}")
    else:
        print(f"cloudlet {args.name}: nothing to remove", file=sys.stderr)
    return 0


def _print_table(c: Cloudlet) -> list[dict[str, Any]]:
    rows = c.status()
    head = ("NODE", "ADDRESS", "NETNS", "LIBVIRTD", "SSHD", "VMS")
    table = [head]
    for r in rows:
        vms = r["vms_running"]
        table.append(
            (
                r["node"],
                r["address"],
                r["netns"] if r["netns_present"] else f"{r['netns']} (missing)",
                f"pid {r['libvirtd_pid']}" if r["libvirtd_pid"] else "down",
                f"pid {r['sshd_pid']}" if r["sshd_pid"] else "down",
                "?" if vms is None else (",".join(vms) if vms else "-"),
            )
        )
    widths = [max(len(str(row[i])) for row in table) for i in range(len(head))]
    for row in table:
        print("  ".join(str(v).ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())
    return rows


def cmd_status(args: argparse.Namespace) -> int:
    c = Cloudlet.load(args.name, args.workdir)
    if args.output == "json":
        data = c.to_dict()
        data["status"] = c.status()
        data["healthy"] = all(
            r["netns_present"] and r["libvirtd_pid"] and r["sshd_pid"] for r in data["status"]
        )
        print(json.dumps(data, indent=2))
        return 0 if data["healthy"] else 1
    print(f"cloudlet {c.name}: {c.subnet}, links {c.rate_mbit:g} Mbit/s, inventory {c.inventory_path}")
    rows = _print_table(c)
    return 0 if all(r["netns_present"] and r["libvirtd_pid"] and r["sshd_pid"] for r in rows) else 1


def cmd_link(args: argparse.Namespace) -> int:
    c = Cloudlet.load(args.name, args.workdir)
    what = f"node {args.node}" if args.node else "every node"
    if args.rate:
        c.set_link(args.rate, args.node)
        print(f"{what}: link rate {parse_rate_mbit(args.rate):g} Mbit/s")
    elif args.cut:
        c.cut_link(args.node)
        print(f"{what}: link cut")
    else:
        c.restore_link(args.node)
        print(f"{what}: link restored")
    return 0


def cmd_proxy(args: argparse.Namespace) -> int:
    c = Cloudlet.load(args.name, args.workdir)
    dp = c.start_delay_proxy(args.node, args.listen_port, args.target, delay_ms=args.delay)
    print(
        f"delay proxy in {dp.node}: {dp.listen[0]}:{dp.listen[1]} -> {dp.target[0]}:{dp.target[1]}, "
        f"+{dp.delay_ms:g} ms each way (Ctrl-C stops it)",
        flush=True,
    )
    signal.signal(signal.SIGTERM, lambda *_: dp.stop())
    try:
        return dp.process.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        dp.stop()


def cmd_guest(args: argparse.Namespace) -> int:
    g = ensure_guest(args.cache_dir)
    print(f"kernel: {g.kernel}\ninitrd: {g.initrd}\ndisk:   {g.disk}")
    return 0
