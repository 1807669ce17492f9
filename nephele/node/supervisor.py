"""The per-instance supervisor: pausing a VM that runs from a snapshot captures a new snapshot.

As in the original (synthesis.py: PAUSED -> `<snapshot>_N`), a user who pauses an instance started from
snapshot NAME (virt-manager, `virsh suspend`) gets NAME_1, then NAME_2, ...: flat deltas against the same
image, never against NAME. The VM is then back where it was, still paused, for the user to resume.

`instance.run` starts one supervisor per such instance (`nephele agent supervise UUID`, detached from
the caller's session). It sleeps on libvirt lifecycle events and exits when the domain is stopped or
removed or handed off. Pauses made by nephele itself (`instance.pause`, which tags the domain
`paused_by=nephele`), pauses while a handoff is marked (`handoff_url`) and the pauses inside a capture
are not user pauses and capture nothing.
"""

from __future__ import annotations

import os
import queue
import subprocess
import sys
from pathlib import Path
from typing import Any

from nephele.errors import Conflict, NepheleError
from nephele.node import images, instances, snapshots
from nephele.node.hypervisor import URI_ENV, watch_lifecycle
from nephele.node.runtime import NodeContext
from nephele.node.store import ROOT_ENV

PAUSED_BY_TAG = "paused_by"
USER_PAUSE = "suspended:paused"
ENDS = (
    "stopped:destroyed",
    "stopped:shutdown",
    "stopped:crashed",
    "stopped:failed",
    "stopped:migrated",  # handed off: the instance lives on another node now
    "undefined",
    "shutdown",
)


def capture(ctx: NodeContext, args: dict[str, Any]) -> dict[str, Any]:
    """Capture a paused instance as snapshot `name` (default: the next <snapshot>_N) and put it back,
    paused, exactly where it was."""
    info = instances.select(ctx, args.get("instance"))
    if info.state != "paused":
        raise Conflict(f"instance {info.tags.get('title')!r} is {info.state}; pause it before capturing it")
    rec = images.resolve(ctx.store, info.tags.get("image", ""))
    base = info.tags.get("snapshot") or rec.name
    dom = ctx.hv.lookup(info.uuid)
    with ctx.store.staging("capture") as stage:
        name = str(args.get("name") or snapshots.next_name(ctx.store, base))
        ctx.progress(f"Instance {info.tags.get('title')!r} paused: capturing snapshot {name}...")
        save = stage / "memory.save"
        ctx.hv.save(dom, save)  # the domain stops; its definition and disk stay
        try:
            disk = instances.disk_of(info)
            snapshots.qemu_img(["convert", "-O", "raw", str(disk), str(stage / "disk.raw")])
        finally:
            # Back where it was, paused, whatever happened to the capture.
            ctx.hv.restore(save, None, running=False)
        target_dir, meta = snapshots.store_capture(ctx, rec, stage, name, info.tags.get("title"), False)
    ctx.log.info("captured %s (%s) as snapshot %s", info.tags.get("title"), info.uuid, name)
    return snapshots.summary(target_dir, meta, ctx.store)


def spawn(ctx: NodeContext, uuid: str) -> int:
    """Start the supervisor of one instance, detached (it outlives the SSH session that ran `run`)."""
    env = {**os.environ, ROOT_ENV: str(ctx.store.root), URI_ENV: ctx.hv.uri}
    with open(os.devnull, "rb") as devnull_in, open(ctx.store.log_file, "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "nephele", "agent", "supervise", uuid],
            stdin=devnull_in,
            stdout=log,
            stderr=log,
            env=env,
            start_new_session=True,
            cwd="/",
        )
    return proc.pid


def supervise(uuid: str, root: str | Path | None = None) -> int:
    """Run until the instance ends; every user pause becomes a snapshot."""
    ctx = NodeContext(root)
    events: queue.Queue[str] = queue.Queue()
    stop = watch_lifecycle(ctx.hv, uuid, events.put)
    ctx.log.info("supervisor %d watching instance %s", os.getpid(), uuid)
    try:
        if ctx.hv.lookup(uuid) is None:
            return 0
        while True:
            try:
                event = events.get(timeout=60)
            except queue.Empty:
                dom = ctx.hv.lookup(uuid)
                if dom is None or ctx.hv.state(dom) == "stopped":
                    return 0
                continue
            if event in ENDS:
                return 0
            if event != USER_PAUSE:
                continue
            dom = ctx.hv.lookup(uuid)
            if dom is None:
                return 0
            tags = ctx.hv.info(dom).tags
            if tags.get(PAUSED_BY_TAG) == "nephele" or tags.get("handoff_url"):
                continue  # nephele's own pause, or a handoff in progress: not a snapshot request
            try:
                capture(ctx, {"instance": uuid})
            except NepheleError as exc:
                ctx.log.error("capture of %s failed: %s", uuid, exc)
            # Drop the events of our own save/restore; a pause after this is a new user pause.
            while not events.empty():
                events.get_nowait()
    finally:
        stop()
        ctx.log.info("supervisor %d for %s exits", os.getpid(), uuid)
        ctx.close()
