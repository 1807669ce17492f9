"""nephele.agent: how the controller reaches a node (docs/agent-protocol.md).

Agent(transport).call(op, args)          one request, its result or a typed AgentError
fan_out({node: transport}, op, args)     the same on many nodes in parallel: node -> result | error
LocalTransport, FakeTransport            here; SSHTransport in nephele.agent.ssh and
transport_for_node(NodeSpec)             in nephele.agent.nodes (they load fabric, which the
                                         node-side `nephele agent call` does not need)
"""

from nephele.agent.client import Agent, fan_out
from nephele.agent.protocol import PROTOCOL_VERSION, make_request
from nephele.agent.transport import AgentTransport, FakeTransport, LocalTransport

__all__ = [
    "PROTOCOL_VERSION",
    "Agent",
    "AgentTransport",
    "FakeTransport",
    "LocalTransport",
    "fan_out",
    "make_request",
]
