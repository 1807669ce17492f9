"""Transports for the nodes of a manifest: `address: local` runs the agent on this machine, anything
else is reached over SSH with the node's user, port and key."""

from __future__ import annotations

from nephele.agent.ssh import SSHTransport
from nephele.agent.transport import AgentTransport, LocalTransport
from nephele.model import NodeSpec
from nephele.node.store import DEFAULT_ROOT, ROOT_ENV

LOCAL_ADDRESSES = ("local",)


def transport_for_node(
    spec: NodeSpec,
    *,
    known_hosts: str | None = None,
    connect_timeout: float = 10.0,
    timeout: float | None = None,
) -> AgentTransport:
    env = {ROOT_ENV: spec.root} if spec.root and spec.root != DEFAULT_ROOT else {}
    if spec.address in LOCAL_ADDRESSES:
        return LocalTransport(spec.name, env=env, timeout=timeout)
    return SSHTransport(
        spec.address,
        node=spec.name,
        user=spec.ssh_user,
        port=spec.ssh_port,
        key=spec.ssh_key,
        known_hosts=known_hosts,
        connect_timeout=connect_timeout,
        timeout=timeout,
        env=env,
    )
