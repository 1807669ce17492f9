"""The ops a node's agent answers, by wire name (docs/agent-protocol.md lists their args and results)."""

from __future__ import annotations

import os
import platform
from collections.abc import Callable
from typing import Any

from nephele import __version__
from nephele.errors import InvalidInput
from nephele.node import copies, history, images, instances, observe, snapshots, supervisor
from nephele.node.runtime import NodeContext

Op = Callable[[NodeContext, dict[str, Any]], Any]


def info(ctx: NodeContext, args: dict[str, Any]) -> dict[str, Any]:
    return {
        "nephele": __version__,
        "hostname": ctx.hostname,
        "root": str(ctx.store.root),
        "python": platform.python_version(),
        "pid": os.getpid(),
        "libvirt": ctx.hv.describe() if args.get("hypervisor", True) else None,
    }


def ping(ctx: NodeContext, args: dict[str, Any]) -> dict[str, Any]:
    return {"pong": True, "nephele": __version__, "root": str(ctx.store.root)}


def logs(ctx: NodeContext, args: dict[str, Any]) -> dict[str, Any]:
    """The last `lines` lines of <root>/nephele.log (0: all of it)."""
    raw = args.get("lines", 10)
    if isinstance(raw, bool) or not isinstance(raw, int):
        raise InvalidInput(f"node.logs: lines must be a whole number, not {str(raw)[:40]!r}")
    n = raw
    path = ctx.store.log_file
    text = path.read_text(errors="replace") if path.is_file() else ""
    lines = text.splitlines()
    return {"file": str(path), "lines": lines[-n:] if n > 0 else lines}


OPS: dict[str, Op] = {
    "ping": ping,
    "node.info": info,
    "node.logs": logs,
    "observe": observe.observe,
    "image.ls": images.ls,
    "image.build": images.build,
    "image.export": images.export,
    "image.import": images.import_,
    "image.rm": images.rm,
    "image.export_delta": copies.export_delta,  # a copy to a node: only what it lacks (copies.py)
    "image.import_delta": copies.import_delta,
    "copy.discard": copies.discard,  # a copy's file in tmp/, once fetched or imported
    "copy.partial": copies.partial,  # what a node holds of a copy's file: resume, not restart
    "snapshot.build": snapshots.build,
    "snapshot.ls": snapshots.ls,
    "snapshot.rm": snapshots.rm,
    "snapshot.export": snapshots.export,
    "snapshot.import": snapshots.import_,
    "instance.run": instances.run,
    "instance.ls": instances.ps,
    "instance.stop": instances.stop,
    "instance.pause": instances.pause,
    "instance.resume": instances.resume,
    "instance.start": instances.start,
    "instance.rm": instances.rm,
    "instance.handoff_url": instances.set_handoff_url,
    "instance.set_ports": instances.set_ports,
    "instance.capture": supervisor.capture,
    "handoff.history": history.op,  # the handoffs this node received (nephele handoffs)
}
