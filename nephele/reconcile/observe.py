"""Observation: ask every node of the manifest for its state, all at once, each with its own timeout.

A node that does not answer in time, refuses the SSH login, or answers something unusable becomes
`NodeObservation.unreachable(node, since=..., error=...)`; it never stops the others. `since` is the
first time it was seen unreachable in a row, remembered across runs in the state directory
(nodes.json), so `plan` and `status` can say "unreachable since 12:03".

Transports come from a factory, one per node (TransportPool caches them for the whole apply, so an SSH
connection opened to observe is reused to act).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from nephele.agent import AgentTransport, fan_out
from nephele.errors import AgentError
from nephele.model import OBSERVED_FORMAT, Desired, NodeObservation, NodeSpec, Observed
from nephele.reconcile import statedir

TransportFactory = Callable[[NodeSpec], AgentTransport]
DEFAULT_TIMEOUT = 30.0
NODES_FILE = "nodes.json"


def utc_now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def default_factory(connect_timeout: float = 10.0) -> TransportFactory:
    """SSH for a node with an address, a local subprocess for `address: local`. No default command
    timeout: observation passes its own per call, and actions (an image import, a handoff) take as
    long as they take; a node that stops answering ends the SSH session instead."""

    def make(spec: NodeSpec) -> AgentTransport:
        from nephele.agent.nodes import transport_for_node  # loads fabric only when a node needs it

        return transport_for_node(spec, connect_timeout=connect_timeout, timeout=None)

    return make


class TransportPool:
    """One transport per node, made on first use by `factory`, closed together."""

    def __init__(self, desired: Desired, factory: TransportFactory) -> None:
        self.desired = desired
        self.factory = factory
        self._made: dict[str, AgentTransport] = {}
        self._lock = threading.Lock()

    def __call__(self, node: str) -> AgentTransport:
        with self._lock:
            t = self._made.get(node)
            if t is None:
                spec = self.desired.nodes.get(node)
                if spec is None:
                    raise AgentError("not a node of the manifest", node=node)
                t = self._made[node] = self.factory(spec)
            return t

    def close(self) -> None:
        with self._lock:
            for t in self._made.values():
                with contextlib.suppress(Exception):  # best effort: the work is done
                    t.close()
            self._made.clear()


class UnreachableLog:
    """Since when each node has been unreachable (nodes.json in the state directory)."""

    def __init__(self, directory: Path | None) -> None:
        self.path = directory / NODES_FILE if directory else None

    def read(self) -> dict[str, str]:
        data = statedir.read_json(self.path, "node log") if self.path else None
        if not isinstance(data, dict):
            return {}
        return {str(k): str(v["unreachable_since"]) for k, v in data.items() if isinstance(v, dict)}

    def update(self, observed: Observed) -> None:
        if self.path is None:
            return
        old = self.read()
        new = {n: o.since for n, o in observed.nodes.items() if not o.reachable and o.since}
        if new != old:
            statedir.write_json(self.path, {n: {"unreachable_since": s} for n, s in sorted(new.items())})


def parse_node(node: str, raw: Any) -> NodeObservation:
    """A node's answer to `observe`, in the model; a malformed answer raises ValueError."""
    if not isinstance(raw, Mapping):
        raise ValueError(f"expected an object, got {type(raw).__name__}")
    try:
        return Observed.from_dict({"format": OBSERVED_FORMAT, "nodes": {node: dict(raw)}}).nodes[node]
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ValueError(f"malformed observation: {type(exc).__name__}: {exc}") from exc


def observe(
    desired: Desired,
    transports: Callable[[str], AgentTransport],
    timeout: float = DEFAULT_TIMEOUT,
    *,
    log: UnreachableLog | None = None,
    now: Callable[[], str] = utc_now,
    nodes: list[str] | None = None,
) -> Observed:
    """Observe `nodes` (default: every node of the manifest) in parallel. `transports(node)` gives each
    node's transport; making one may itself fail (bad key file...), which counts as unreachable."""
    names = list(nodes if nodes is not None else desired.nodes)
    seen_dark = log.read() if log else {}
    made: dict[str, AgentTransport] = {}
    failed: dict[str, str] = {}
    for n in names:
        try:
            made[n] = transports(n)
        except AgentError as exc:
            failed[n] = str(exc)
    # The node's own name for itself does not matter: its answer is filed under the manifest's name.
    answers = fan_out(made, "observe", {}, timeout) if made else {}
    result: dict[str, NodeObservation] = {}
    stamp = now()
    for n in names:
        raw = answers.get(n) if n in made else None
        error = failed.get(n)
        if error is None and isinstance(raw, AgentError):
            error = str(raw)
        if error is None:
            try:
                result[n] = parse_node(n, raw)
                continue
            except ValueError as exc:
                error = f"node {n}: {exc}"
        result[n] = NodeObservation.unreachable(n, since=seen_dark.get(n, stamp), error=error)
    observed = Observed(nodes=result)
    if log is not None:
        log.update(observed)
    return observed
