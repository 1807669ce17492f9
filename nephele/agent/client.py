"""The controller's view of node agents: Agent (one node) and fan_out (many nodes in parallel).

fan_out returns a dict node -> result | AgentError, like fabric's GroupResult: a partial answer is the
normal case, and the caller decides what an unreachable node means.
"""

from __future__ import annotations

import concurrent.futures as cf
import time
from collections.abc import Mapping
from typing import Any

from nephele.agent import protocol
from nephele.agent.transport import AgentTransport, ProgressFn
from nephele.errors import AgentError, NodeUnreachable


class Agent:
    """Calls ops on one node through a transport and returns their results (or raises RemoteError)."""

    def __init__(self, transport: AgentTransport) -> None:
        self.transport = transport

    @property
    def node(self) -> str:
        return self.transport.node

    def call(
        self,
        op: str,
        args: Mapping[str, Any] | None = None,
        *,
        timeout: float | None = None,
        progress: ProgressFn | None = None,
    ) -> Any:
        request = protocol.make_request(op, args)
        response = self.transport.call(request, timeout=timeout, progress=progress)
        return protocol.result_of(response, request, node=self.node)

    def close(self) -> None:
        self.transport.close()


def fan_out(
    nodes: Mapping[str, AgentTransport],
    op: str,
    args: Mapping[str, Any] | None = None,
    timeout: float | None = 60.0,
    *,
    progress: ProgressFn | None = None,
) -> dict[str, Any | AgentError]:
    """Run one op on every node at once. Each value is the node's result or the AgentError it produced
    (NodeUnreachable when it did not answer within `timeout` seconds)."""
    results: dict[str, Any | AgentError] = {}
    if not nodes:
        return results
    deadline = None if timeout is None else time.monotonic() + timeout
    pool = cf.ThreadPoolExecutor(max_workers=min(32, len(nodes)), thread_name_prefix="nephele-fan-out")
    try:
        futures = {
            pool.submit(Agent(t).call, op, args, timeout=timeout, progress=progress): name
            for name, t in nodes.items()
        }
        remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
        done, _ = cf.wait(futures, timeout=remaining)
        for fut, name in futures.items():
            if fut not in done:
                results[name] = NodeUnreachable(f"no answer to {op!r} within {timeout:g} s", node=name)
                continue
            exc = fut.exception()
            if exc is None:
                results[name] = fut.result()
            elif isinstance(exc, AgentError):
                results[name] = exc
            else:
                # A transport bug must not hide the other nodes' answers.
                results[name] = NodeUnreachable(f"{type(exc).__name__}: {exc}", node=name)
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
    return {name: results[name] for name in nodes}
