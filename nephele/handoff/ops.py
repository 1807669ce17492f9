"""The agent ops of a live handoff, by wire name (registered next to nephele.node.ops.OPS by the agent).

The implementations are imported when an op runs: they pull in the delta engine (numba), which every
other agent call would otherwise pay for at start-up."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from nephele.node.runtime import NodeContext

Op = Callable[[NodeContext, dict[str, Any]], Any]


def _prepare(ctx: NodeContext, args: dict[str, Any]) -> Any:
    from nephele.handoff import source

    return source.prepare(ctx, args)


def _send(ctx: NodeContext, args: dict[str, Any]) -> Any:
    from nephele.handoff import source

    return source.send(ctx, args)


def _abort(ctx: NodeContext, args: dict[str, Any]) -> Any:
    from nephele.handoff import source

    return source.abort(ctx, args)


def _release(ctx: NodeContext, args: dict[str, Any]) -> Any:
    from nephele.handoff import source

    return source.release(ctx, args)


def _receive(ctx: NodeContext, args: dict[str, Any]) -> Any:
    from nephele.handoff import dest

    return dest.receive(ctx, args)


def _warm(ctx: NodeContext, args: dict[str, Any]) -> Any:
    """Build the reference images and block indexes of an image now (what a handoff would otherwise do
    first): call it when an image arrives on a node."""
    from nephele.handoff import refs
    from nephele.node import images, migrate

    image = images.resolve(ctx.store, str(args.get("image") or ""))
    prepared = sorted(refs.prepare(ctx.store, image))
    # libvirt probes QEMU on its first domain-capabilities query (4.3 s measured on a fresh libvirtd) and
    # caches the answer: the destination's platform check then costs nothing during the handoff
    for virt_type in ("qemu", "kvm"):
        migrate.platform_problem(ctx.hv, {"arch": "x86_64", "machine": "pc", "virt_type": virt_type})
    return {"image": image.content_id, "refs": prepared}


def _cleanup(ctx: NodeContext, args: dict[str, Any]) -> Any:
    from nephele.handoff import dest

    return dest.cleanup(ctx, args)


HANDOFF_OPS: dict[str, Op] = {
    "handoff.prepare": _prepare,
    "handoff.send": _send,
    "handoff.receive": _receive,
    "handoff.cleanup": _cleanup,
    "handoff.abort": _abort,
    "handoff.release": _release,
    "handoff.warm": _warm,
}
