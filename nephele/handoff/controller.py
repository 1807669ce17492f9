"""The controller's side of a live handoff: ``perform`` (the call the reconciler and nephele-client use).

    perform(src_agent, dst_agent, instance, dest_node, on_progress) -> HandoffResult

The agents are ``nephele.agent.Agent`` objects (anything with the same ``call``); this module does not
import the agent package (it sits below it). The sequence:

1. source ``handoff.prepare``: the instance must run there; what the destination must know about it;
2. a fresh random handoff id and token (never stored, never logged);
3. destination ``handoff.receive`` in a thread: it opens the handoff port for this handoff only and
   reports ready (with the loopback ports its QEMU will use, and the reference images it holds);
4. source ``handoff.send``: libvirt's live migration through the channels, progress every second;
5. the destination's answer: the stream was verified and the domain runs there.

If the source fails, the destination's receive call cleans up by itself when its channels close; if it
cannot answer (killed, or cut off), ``handoff.cleanup`` is asked to remove what it left.
"""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from nephele.errors import HandoffError, NepheleError
from nephele.handoff import channel as ch
from nephele.model import NodeSpec

PREFIX = "@handoff "
READY_TIMEOUT = 600.0  # the destination may first index a large base image
DST_GRACE = 90.0  # after the source ended, how long the destination may take to answer
CLEANUP_TIMEOUT = 90.0


class AgentLike(Protocol):
    @property
    def node(self) -> str: ...

    def call(
        self,
        op: str,
        args: Mapping[str, Any] | None = None,
        *,
        timeout: float | None = None,
        progress: Callable[[str], None] | None = None,
    ) -> Any: ...


@dataclass
class HandoffResult:
    instance: dict[str, Any]
    url: str
    source: dict[str, Any]
    destination: dict[str, Any]
    events: list[dict[str, Any]] = field(default_factory=list)

    @property
    def downtime_s(self) -> float | None:
        d = self.destination.get("downtime_s")
        if d is not None:
            return float(d)
        # The stop time travels on the memory channel; on a fast link the stream can end before it
        # does. The source's own record of the stop, against the destination's resume, gives the same.
        stopped, resumed = self.source.get("stopped_at"), self.destination.get("resumed_at")
        return None if stopped is None or resumed is None else round(float(resumed) - float(stopped), 3)

    @property
    def elapsed_s(self) -> float:
        return float(self.source.get("elapsed_s", 0.0))


ProgressFn = Callable[[dict[str, Any]], None]


def parse_event(line: str) -> dict[str, Any] | None:
    if not line.startswith(PREFIX):
        return None
    try:
        ev = json.loads(line[len(PREFIX) :])
    except ValueError:
        return None
    return ev if isinstance(ev, dict) else None


def perform(
    src: AgentLike,
    dst: AgentLike,
    instance: str,
    dest_node: NodeSpec,
    on_progress: ProgressFn | None = None,
    *,
    downtime_ms: int = 1000,
    source_address: str | None = None,
    on_text: Callable[[str], None] | None = None,
    heatmap: bool | int | None = None,
    heatmap_linger: float = 0.0,
    via: tuple[str, int] | None = None,
    bandwidth_mbit: float | None = None,
    resume: bool = True,
    timeout_s: float | None = None,
    auto_converge: bool = True,
) -> HandoffResult:
    """Hand a running instance off from src's node to dest_node (reached through dst). ``via``: the
    address the source connects to instead of the destination's handoff port (a relay, a WAN proxy).
    ``bandwidth_mbit``: a cap on what this handoff sends over the node link (all its channels).
    ``resume``: the destination offers the pages it kept from an earlier failed attempt of this instance
    (and keeps this attempt's if it fails); False: a fresh handoff (benchmarks, or to rule the cache out).
    ``timeout_s``: the source gives up (the instance keeps running there) if the switchover has not begun
    this long after the migration started; None: no limit. ``auto_converge``: QEMU slows the guest's
    vCPUs while it dirties memory faster than the link carries it (False: never)."""
    if bandwidth_mbit is not None and not bandwidth_mbit > 0:
        raise HandoffError(f"bandwidth cap {bandwidth_mbit} Mbit/s: it must be a positive number")
    if timeout_s is not None and not timeout_s > 0:
        raise HandoffError(f"handoff timeout {timeout_s} s: it must be a positive number")
    notify = on_progress or (lambda ev: None)
    text = on_text or (lambda line: None)
    info = src.call("handoff.prepare", {"instance": instance})
    url = f"tcp://{dest_node.address}:{dest_node.handoff_port}"
    notify({"event": "initiated", "title": info["title"], "uuid": info["uuid"], "url": url})
    hid, token = ch.new_handoff_id(), ch.new_token()
    ready: dict[str, Any] = {}
    ready_evt = threading.Event()
    dst_out: dict[str, Any] = {}

    def dst_progress(line: str) -> None:
        ev = parse_event(line)
        if ev is None:
            text(f"[{dst.node}] {line}")
            return
        if ev.get("event") == "ready":
            ready.update(ev)
            ready_evt.set()
        notify({**ev, "side": "destination"})

    def run_dst() -> None:
        try:
            dst_out["result"] = dst.call(
                "handoff.receive",
                {
                    "handoff_id": hid.hex(),
                    "token": token.hex(),
                    "instance": info,
                    "port": dest_node.handoff_port,
                    "source_ip": source_address or src.node,
                    "heatmap": heatmap,  # the destination's heatmap page (None: as the node is configured)
                    "heatmap_linger": heatmap_linger,
                    "resume": resume,
                },
                progress=dst_progress,
            )
        except BaseException as exc:
            dst_out["error"] = exc
        finally:
            ready_evt.set()

    t = threading.Thread(target=run_dst, name="handoff-destination", daemon=True)
    t.start()
    ready_evt.wait(READY_TIMEOUT)
    if not ready:
        t.join(5)
        err = dst_out.get("error")
        what = f"the handoff of {info['title']!r} ({info['uuid']})"
        if isinstance(err, NepheleError):
            raise HandoffError(f"the destination {dest_node.name} refused {what}: {err}") from None
        raise HandoffError(f"the destination {dest_node.name} did not get ready for {what} ({err})")

    def src_progress(line: str) -> None:
        ev = parse_event(line)
        if ev is None:
            text(f"[{src.node}] {line}")
            return
        notify({**ev, "side": "source"})

    try:
        src_result = src.call(
            "handoff.send",
            {
                "uuid": info["uuid"],
                "dest_address": via[0] if via else dest_node.address,
                "dest_port": via[1] if via else dest_node.handoff_port,
                "handoff_id": hid.hex(),
                "token": token.hex(),
                "memory_port": ready["memory_port"],
                "disk_port": ready["disk_port"],
                "refs": ready.get("refs", []),
                "downtime_ms": downtime_ms,
                "bandwidth_mbit": bandwidth_mbit,
                "timeout_s": timeout_s,
                "auto_converge": auto_converge,
                "url": url,
            },
            progress=src_progress,
        )
    except NepheleError as exc:
        # The destination notices a failed source when its channels close (or the source's ABORT); a
        # cleanup call would queue behind the receive call on the same agent anyway.
        t.join(DST_GRACE)
        if "result" in dst_out:
            # The destination confirmed: verified stream, libvirt's Finish done, the domain runs there.
            # The source's libvirt lost Finish's answer (the link went down after the stop-and-copy) and
            # resumed its own copy: libvirt cannot tell a lost answer from a failed Finish. The
            # switchover completed; keeping both would be a split brain: release the source's copy.
            try:
                src.call("handoff.release", {"uuid": info["uuid"]}, timeout=CLEANUP_TIMEOUT)
            except NepheleError as rel:
                raise HandoffError(
                    f"{info['title']!r} runs on {dest_node.name} (the handoff completed there), but the "
                    f"source lost the confirmation ({exc}) and could not release its copy ({rel}): remove "
                    f"instance {info['uuid']} from {src.node} before anything else uses it"
                ) from None
            result = HandoffResult(info, url, {"error": str(exc), "released": True}, dst_out["result"])
            notify({"event": "completed", "downtime_s": result.downtime_s, "source_error": str(exc)})
            return result
        if t.is_alive() or ("error" in dst_out and "result" not in dst_out):
            with contextlib.suppress(NepheleError):  # the destination could not clean up by itself
                dst.call("handoff.cleanup", {"uuid": info["uuid"]}, timeout=CLEANUP_TIMEOUT)
        with contextlib.suppress(NepheleError):  # a killed source process left its mark (or a pause)
            src.call("handoff.abort", {"uuid": info["uuid"]}, timeout=CLEANUP_TIMEOUT)
        dst_err = dst_out.get("error")
        detail = f"; destination: {dst_err}" if dst_err is not None else ""
        raise HandoffError(f"{exc}{detail}") from None
    t.join(DST_GRACE)
    if "result" not in dst_out:
        err = dst_out.get("error", "no answer")
        raise HandoffError(
            f"the source completed the migration but the destination did not confirm it ({err}); "
            f"check instance {info['uuid']} on {dest_node.name}"
        )
    result = HandoffResult(info, url, src_result, dst_out["result"])
    notify({"event": "completed", "downtime_s": result.downtime_s, "elapsed_s": result.elapsed_s})
    return result
