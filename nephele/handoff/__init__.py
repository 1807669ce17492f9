"""nephele.handoff: a live handoff of a running instance between two nodes.

QEMU's own pre-copy live migration, driven by libvirt (peer to peer), with its three TCP paths (memory
stream, NBD disk mirror, libvirt control) carried through nephele's authenticated handoff channels: the
memory stream is parsed and every page goes through the delta engine against what the destination
already holds, then rebuilt byte for byte and verified before the destination may resume.
docs/handoff.md has the design, the measurements and the failure behaviour.

    perform(src_agent, dst_agent, instance, dest_node, on_progress) -> HandoffResult   (controller)
    HANDOFF_OPS (nephele.handoff.ops)        the node-side agent ops
"""

from nephele.handoff.controller import HandoffResult, perform

__all__ = ["HandoffResult", "perform"]
