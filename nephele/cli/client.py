"""`nephele-client HOST COMMAND ...`: the original tool's imperative interface, same commands and flags.

HOST is `local` (this machine), a node of a local cloudlet (`--cloudlet NAME` or NEPHELE_CLOUDLET; then
HOST is a node name such as edge-a), or `[user@]host[:port]` reached over SSH as root by default, with the
key from `-i` or NEPHELE_SSH_KEY. Each command is one agent request (docs/agent-protocol.md); the node
prints progress on stderr while it works.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from nephele.agent.client import Agent
from nephele.agent.transport import AgentTransport, LocalTransport
from nephele.errors import NepheleError

Handler = Callable[[Agent, argparse.Namespace], int]


# ------------------------------------------------------------------------------------------- hosts


def parse_host(text: str) -> tuple[str, str, int]:
    """`[user@]host[:port]` -> (user, host, port); root and 22 by default."""
    user, _, rest = text.rpartition("@")
    host, port = rest, 22
    if rest.count(":") == 1:
        host, _, p = rest.partition(":")
        try:
            port = int(p)
        except ValueError:
            raise NepheleError(f"host {text!r}: port {p!r} is not a number") from None
    if not host:
        raise NepheleError(f"host {text!r}: no host name")
    return user or "root", host, port


def transport_for(args: argparse.Namespace) -> AgentTransport:
    host: str = args.host
    if host == "local":
        return LocalTransport("local", timeout=args.timeout)
    from nephele.agent.ssh import SSHTransport

    cloudlet_name = args.cloudlet or os.environ.get("NEPHELE_CLOUDLET")
    if cloudlet_name:
        from nephele.cloudlet import Cloudlet

        c = Cloudlet.load(cloudlet_name)
        for n in c.nodes:
            if host in (n.name, n.address):
                return SSHTransport(
                    n.address,
                    node=n.name,
                    user=n.ssh_user,
                    port=n.ssh_port,
                    key=n.ssh_key,
                    known_hosts=n.known_hosts,
                    timeout=args.timeout,
                )
        names = ", ".join(n.name for n in c.nodes)
        raise NepheleError(f"cloudlet {cloudlet_name!r} has no node {host!r} (its nodes: {names})")
    user, hostname, port = parse_host(host)
    return SSHTransport(
        hostname,
        node=host,
        user=user,
        port=port,
        key=args.identity or os.environ.get("NEPHELE_SSH_KEY"),
        timeout=args.timeout,
    )


# ---------------------------------------------------------------------------------------- output


def table(rows: Sequence[Sequence[Any]], widths: Sequence[int]) -> str:
    """The original's fixed-width columns (left aligned, gaps between), widened to fit long values."""
    out = []
    for row in rows:
        cells = ["" if v is None else str(v) for v in row]
        out.append("  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip())
    return "\n".join(out)


def _images(agent: Agent, args: argparse.Namespace) -> int:
    rows: list[list[Any]] = [["IMAGE ID", "NAME", "SOURCE"]]
    rows += [[i["id"], i["name"], i["source"]] for i in agent.call("image.ls")]
    print(table(rows, [12, 24, 0]))
    return 0


def _image_build(agent: Agent, args: argparse.Namespace) -> int:
    req = {
        "path": args.path,
        "title": args.title,
        "cpus": args.cpu,
        "memory_kib": args.mem,
        "kernel": args.kernel,
        "initrd": args.initrd,
        "cmdline": args.append,
        "timeout": args.wait,
    }
    r = agent.call("image.build", {k: v for k, v in req.items() if v is not None})
    print(f"Created Base VM from this source image: {r['source']}")
    print(f"Base Disk Image: {r['path']}/disk.raw")
    print(f"Base Memory Snapshot: {r['path']}/memory.save")
    print(f"IMAGE ID: {r['id']}")
    return 0


def _image_export(agent: Agent, args: argparse.Namespace) -> int:
    r = agent.call("image.export", {"id": args.id, "dest": args.dest})
    print(f"Exported image {r['id']} ({r['name']}) to {r['file']} ({r['file_bytes']} bytes)")
    return 0


def _image_import(agent: Agent, args: argparse.Namespace) -> int:
    r = agent.call("image.import", {"path": args.path})
    state = "Imported" if r["created_new"] else "Already present:"
    print(f"{state} image {r['id']} ({r['name']}) into {r['path']}")
    return 0


def _image_rm(agent: Agent, args: argparse.Namespace) -> int:
    r = agent.call("image.rm", {"id": args.id, "force": args.force})
    for w in r.get("warnings", []):
        print(f"warning: {w}", file=sys.stderr)
    print(f"Image {r['id']} ({r['name']}) deleted.")
    return 0


def _snapshots(agent: Agent, args: argparse.Namespace) -> int:
    rows: list[list[Any]] = [["SNAPSHOT", "IMAGE ID", "CREATED"]]
    rows += [[s["name"], s["image"][:12], s.get("created")] for s in agent.call("snapshot.ls")]
    print(table(rows, [43, 12, 0]))
    return 0


def _snapshot_build(agent: Agent, args: argparse.Namespace) -> int:
    r = agent.call(
        "snapshot.build",
        {
            "image": args.id,
            "dest": args.dest,
            "title": args.title,
            "disk_only": args.disk_only,
            "timeout": args.wait,
        },
    )
    print(f"Created snapshot {r['name']} ({r['id']}) of image {r['image'][:12]}")
    print(f"Delta: {r['delta_bytes']} bytes")
    return 0


def _snapshot_export(agent: Agent, args: argparse.Namespace) -> int:
    r = agent.call("snapshot.export", {"name": args.path, "dest": args.dest})
    print(f"Exported snapshot {r['name']} ({r['id']}) to {r['file']} ({r['file_bytes']} bytes)")
    return 0


def _snapshot_import(agent: Agent, args: argparse.Namespace) -> int:
    r = agent.call("snapshot.import", {"path": args.path})
    print(f"Successfully imported snapshot ({r['name']}, {r['id']}) of image {r['image'][:12]}.")
    return 0


def _snapshot_rm(agent: Agent, args: argparse.Namespace) -> int:
    agent.call("snapshot.rm", {"path": args.path})
    print("Snapshot deleted.")
    return 0


def _run(agent: Agent, args: argparse.Namespace) -> int:
    r = agent.call(
        "instance.run",
        {"snapshot": args.snapshot, "title": args.title, "ports": args.ports, "disk_only": args.disk_only},
    )
    print(f"HOST\t\t{args.host}\nTITLE\t\t{r['title']}\nSNAPSHOT\t{args.snapshot}\nFWDPORTS\t{args.ports}")
    print(f"UUID\t\t{r['uuid']}")
    return 0


def _ps(agent: Agent, args: argparse.Namespace) -> int:
    rows: list[list[Any]] = [["PID", "TITLE", "PORTS", "UUID", "STATE", "STARTED", "HANDOFFURL"]]
    for i in agent.call("instance.ls"):
        rows.append(
            [i["pid"] or "-", i["title"], ",".join(i["ports"]) or "-", i["uuid"], i["state"], i["started"],
             i["handoff_url"] or ""]
        )  # fmt: skip
    print(table(rows, [6, 20, 12, 36, 8, 20, 0]))
    return 0


def _instance_op(op: str, verb: str) -> Handler:
    def handler(agent: Agent, args: argparse.Namespace) -> int:
        r = agent.call(op, {"instance": args.instance})
        print(f"{r['title']} ({r['uuid']}) {verb}")
        return 0

    return handler


def _handoff(agent: Agent, args: argparse.Namespace) -> int:
    from nephele.handoff.report import run_handoff
    from nephele.model import NodeSpec

    dst = Agent(transport_for(argparse.Namespace(**{**vars(args), "host": args.dest})))
    try:
        address = str(getattr(dst.transport, "host", args.dest))
        spec = NodeSpec(name=dst.node, address=address, handoff_port=args.port)
        src_address = str(getattr(agent.transport, "host", args.host))
        run_handoff(
            agent,
            dst,
            args.title,
            spec,
            source_address=src_address,
            downtime_ms=args.downtime_ms,
            heatmap=args.heatmap,
            bandwidth_mbit=args.bandwidth_mbit,
            timeout_s=args.handoff_timeout,
            auto_converge=not args.no_auto_converge,
        )
    finally:
        dst.close()
    return 0


def _logs(agent: Agent, args: argparse.Namespace) -> int:
    r = agent.call("node.logs", {"lines": 0 if args.all else 10})
    for line in r["lines"]:
        print(line)
    return 0


def _observe(agent: Agent, args: argparse.Namespace) -> int:
    print(json.dumps(agent.call("observe", {"node": agent.node}), indent=2, sort_keys=True))
    return 0


# ---------------------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nephele-client", description="Manage VMs across cloudlets.")
    p.add_argument("host", metavar="HOST", help="local, [user@]host[:port], or a node of --cloudlet")
    p.add_argument("-i", "--identity", metavar="KEY", help="SSH private key (default: $NEPHELE_SSH_KEY)")
    p.add_argument("--cloudlet", metavar="NAME", help="resolve HOST in this local cloudlet's inventory")
    p.add_argument("--timeout", type=float, default=None, help="give up on the node after S seconds")
    sub = p.add_subparsers(title="command", dest="command", required=True, metavar="COMMAND")

    sub.add_parser("ps", help="List running nephele instances").set_defaults(func=_ps)
    logs = sub.add_parser("logs", help="Show the node's log (last 10 lines)")
    logs.add_argument("-a", "--all", action="store_true", help="Show all lines")
    logs.set_defaults(func=_logs)
    sub.add_parser("images", help="List base images tracked by nephele").set_defaults(func=_images)
    sub.add_parser("observe", help="The node's full state as JSON").set_defaults(func=_observe)

    image = sub.add_parser("image", help="Management of base VM images")
    isub = image.add_subparsers(title="image", dest="image_command", required=True, metavar="ACTION")
    b = isub.add_parser("build", help="Build a base image: boot PATH, pause the VM to capture it")
    b.add_argument("path", help="a disk image, or a .json/.nvm descriptor (disk, kernel, initrd, cmdline)")
    b.add_argument("-t", "--title", help="Title of the VM instance to display")
    b.add_argument("-c", "--cpu", type=int, help="Number of vCPUs (default 1)")
    b.add_argument("-m", "--mem", type=int, help="Memory in KiB (default 262144)")
    b.add_argument("--kernel", help="boot this kernel directly (path on the node)")
    b.add_argument("--initrd", help="initrd for --kernel")
    b.add_argument("--append", help="kernel command line for --kernel")
    b.add_argument("--wait", type=float, help="give up if the VM is not paused within S seconds")
    b.set_defaults(func=_image_build)
    e = isub.add_parser("export", help="Export a zip file containing a base image")
    e.add_argument("id", help="ID of base image to export")
    e.add_argument("dest", help="destination of exported zip file (on the node)")
    e.set_defaults(func=_image_export)
    im = isub.add_parser("import", help="Import a base image from an exported zip file")
    im.add_argument("path", help="an existing zip file containing a base image (on the node)")
    im.set_defaults(func=_image_import)
    isub.add_parser("ls", help="List base images tracked by nephele").set_defaults(func=_images)
    rm = isub.add_parser("rm", help="Remove a base image from nephele")
    rm.add_argument("id", help="ID of base image to remove")
    rm.add_argument("-f", "--force", action="store_true", help="remove even if snapshots depend on it")
    rm.set_defaults(func=_image_rm)

    sub.add_parser("snapshots", help="List snapshots known to nephele").set_defaults(func=_snapshots)
    snap = sub.add_parser("snapshot", help="Management of VM snapshots")
    ssub = snap.add_subparsers(title="snapshot", dest="snapshot_command", required=True, metavar="ACTION")
    sb = ssub.add_parser("build", help="Interact with a base VM to create a new snapshot")
    sb.add_argument("id", help="an existing base image to start with")
    sb.add_argument("dest", help="Destination path for snapshot")
    sb.add_argument("-t", "--title", help="Title of the VM instance to display")
    sb.add_argument("-d", "--disk-only", action="store_true", help="Ignore memory, disk blocks only")
    sb.add_argument("-m", "--free-mem", action="store_true", help="Extract free memory (default=False)")
    sb.add_argument("-n", "--no-trim", action="store_true", help="Disable TRIM support (default=False)")
    sb.add_argument("-z", "--zip", default=True, action="store_true", help="Package into one zip (default)")
    sb.add_argument("--wait", type=float, help="give up if the VM is not paused within S seconds")
    sb.set_defaults(func=_snapshot_build)
    ssub.add_parser("ls", help="List snapshots known to nephele").set_defaults(func=_snapshots)
    sx = ssub.add_parser("export", help="Export a snapshot into one zip file")
    sx.add_argument("path", help="the snapshot (name or ID)")
    sx.add_argument("dest", help="destination zip file (on the node)")
    sx.set_defaults(func=_snapshot_export)
    si = ssub.add_parser("import", help="Import a snapshot from a zip file (its image must be present)")
    si.add_argument("path", help="an exported snapshot zip (on the node)")
    si.set_defaults(func=_snapshot_import)
    srm = ssub.add_parser("rm", help="Remove a snapshot from nephele")
    srm.add_argument("path", help="Path of snapshot to remove")
    srm.set_defaults(func=_snapshot_rm)

    run = sub.add_parser("run", help="Instantiate a VM from an existing snapshot (or image)")
    run.add_argument("snapshot", help="Disk/memory snapshot (or image ID/name) to instantiate from")
    run.add_argument("title", help="Title of the VM instance to display")
    run.add_argument("-d", "--disk-only", action="store_true", help="Cold-boot the disk, ignore memory")
    run.add_argument("-p", "--ports", help="Ports to forward from host to guest: -p 80,443 or -p 8080:80")
    run.set_defaults(func=_run)

    for name, op, verb, what in (
        ("stop", "instance.stop", "stopped", "Stop (power off) an instance"),
        ("pause", "instance.pause", "paused", "Pause an instance"),
        ("resume", "instance.resume", "resumed", "Resume a paused instance"),
        ("start", "instance.start", "started", "Boot a stopped instance from its disk"),
        ("rm", "instance.rm", "removed", "Remove an instance (stops it first)"),
    ):
        sp = sub.add_parser(name, help=what)
        sp.add_argument("instance", help="title or UUID")
        sp.set_defaults(func=_instance_op(op, verb))

    h = sub.add_parser("handoff", help="Handoff a running instance to another node")
    h.add_argument("title", help="Title of the VM instance to handoff")
    h.add_argument("dest", help="Handoff destination - IP address or DNS name.")
    h.add_argument("--port", type=int, default=8022, help="the destination's handoff port (default 8022)")
    h.add_argument("--downtime-ms", type=int, default=1000, help="downtime budget in ms (default 1000)")
    h.add_argument(
        "--bandwidth-mbit",
        type=float,
        metavar="MBIT",
        help="cap what this handoff sends over the link, all channels together (default: no cap)",
    )
    h.add_argument(
        "--handoff-timeout",
        type=float,
        metavar="SECONDS",
        help="give up if the switchover has not begun this long after the migration started; the "
        "instance keeps running on the source (default: no limit)",
    )
    h.add_argument(
        "--no-auto-converge",
        action="store_true",
        help="never slow the guest's vCPUs (by default QEMU throttles a guest that dirties memory "
        "faster than the link carries it, so that the handoff converges)",
    )
    h.add_argument(
        "--heatmap",
        nargs="?",
        const=True,
        type=int,
        metavar="PORT",
        help="the destination serves a live heatmap page, http://DEST:PORT/heatmap/ (default port 8023)",
    )
    h.set_defaults(func=_handoff)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        transport = transport_for(args)
        try:
            return int(args.func(Agent(transport), args))
        finally:
            transport.close()
    except NepheleError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
