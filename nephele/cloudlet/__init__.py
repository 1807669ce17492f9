"""nephele.cloudlet: a local multi-node cloudlet on one machine (nodes as network + mount namespaces, each
with its own libvirtd, sshd and /var/nephele, on a tbf-shaped bridge) and the reproducible test guest."""

from nephele.cloudlet.core import (
    Cloudlet,
    CloudletNode,
    DelayProxy,
    default_workdir,
    parse_delay_ms,
    parse_rate_mbit,
    reap_orphans,
    teardown,
)

__all__ = [
    "Cloudlet",
    "CloudletNode",
    "DelayProxy",
    "default_workdir",
    "parse_delay_ms",
    "parse_rate_mbit",
    "reap_orphans",
    "teardown",
]
