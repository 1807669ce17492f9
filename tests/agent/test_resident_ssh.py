"""The resident agent over SSH on a real cloudlet node: read-only calls share one `nephele agent serve`
process, other ops still get a process each, a dead or stuck session is dropped and replaced, and a node
without `serve` (an older nephele) is answered one process per call."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from nephele.agent.client import Agent
from nephele.agent.ssh import SSHTransport
from nephele.cloudlet import Cloudlet
from nephele.cloudlet.core import CloudletNode
from nephele.errors import NodeUnreachable, RemoteError

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def node() -> Iterator[CloudletNode]:
    # One private node for the module (no VMs): these tests kill and stop its agents.
    from support import CLOUDLET_DAEMONS, CLOUDLET_TOOLS, cloudlet_workdir, require

    require(tools=CLOUDLET_TOOLS, files=CLOUDLET_DAEMONS)
    c = Cloudlet.up(
        f"ra{os.getpid() % 100000}",
        1,
        rate_mbit=1000,
        delay_ms=0,
        workdir=cloudlet_workdir(),
        owner_pid=os.getpid(),
    )
    try:
        yield c.nodes[0]
    finally:
        c.down()


@pytest.fixture
def transport(node: CloudletNode) -> Iterator[Callable[..., SSHTransport]]:
    made: list[SSHTransport] = []

    def make(**kw: Any) -> SSHTransport:
        t = SSHTransport(
            node.address,
            node=node.name,
            user=node.ssh_user,
            port=node.ssh_port,
            key=node.ssh_key,
            known_hosts=node.known_hosts,
            timeout=60,
            **kw,
        )
        made.append(t)
        return t

    yield make
    for t in made:
        t.close()


def cmdline(pid: int) -> list[str]:
    # The cloudlet's nodes share the host's process table.
    return [a for a in Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0") if a]


def wait_gone(pid: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while Path(f"/proc/{pid}").exists():
        assert time.monotonic() < deadline, f"process {pid} still there after {timeout} s"
        time.sleep(0.05)


def test_read_only_calls_share_one_resident_agent(
    node: CloudletNode, transport: Callable[..., SSHTransport]
) -> None:
    t = transport()
    agent = Agent(t)
    pids = [agent.call("node.info")["pid"] for _ in range(4)]
    assert len(set(pids)) == 1, pids
    pid = pids[0]
    assert t.resident_pid == pid
    assert cmdline(pid)[2:4] == ["agent", "serve"], cmdline(pid)
    obs = agent.call("observe", {"node": node.name})
    assert obs["reachable"] is True and obs["instances"] == {}
    assert agent.call("image.ls") == []
    # Not read-only: a process of its own, and the resident agent is left as it was.
    with pytest.raises(RemoteError) as err:
        agent.call("instance.stop", {"instance": "no-such-instance"})
    assert err.value.kind == "not_found"
    assert agent.call("node.info")["pid"] == pid
    # Closing the transport ends the agent on the node (EOF on its stdin).
    t.close()
    wait_gone(pid)


def test_a_killed_agent_is_replaced_on_the_next_call(transport: Callable[..., SSHTransport]) -> None:
    t = transport()
    agent = Agent(t)
    assert agent.call("ping")["pong"] is True
    first = t.resident_pid
    assert first is not None
    os.kill(first, signal.SIGKILL)
    wait_gone(first)
    time.sleep(0.3)  # sshd reports the exit on the channel
    second = agent.call("node.info")["pid"]
    assert second != first and t.resident_pid == second


def test_a_stuck_agent_is_unreachable_then_replaced(transport: Callable[..., SSHTransport]) -> None:
    t = transport()
    agent = Agent(t)
    pid = agent.call("node.info")["pid"]
    os.kill(pid, signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        with pytest.raises(NodeUnreachable, match="did not answer"):
            agent.call("observe", timeout=2)
        assert time.monotonic() - t0 < 10
        assert t.resident_pid is None  # dropped with its connection
    finally:
        os.kill(pid, signal.SIGCONT)
    wait_gone(pid)  # EOF on its stdin once it runs again
    assert agent.call("node.info")["pid"] not in (pid, None)


def test_a_node_without_serve_gets_one_process_per_call(transport: Callable[..., SSHTransport]) -> None:
    # An older nephele has no `agent serve`: argparse refuses the action at once, as it does this one.
    t = transport(serve_command="nephele agent serve-not-in-this-version", daemon=False)
    agent = Agent(t)
    pids = [agent.call("node.info")["pid"] for _ in range(3)]
    assert len(set(pids)) == 3, pids
    assert t.resident_pid is None
    assert agent.call("observe")["reachable"] is True


def test_serve_disabled(transport: Callable[..., SSHTransport]) -> None:
    t = transport(serve_command=None)
    agent = Agent(t)
    assert len({agent.call("node.info")["pid"] for _ in range(2)}) == 2
    assert t.resident_pid is None


# ------------------------------------------------------------------------------ the node's agent daemon


def _ppid(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def _comm(pid: int) -> str:
    return Path(f"/proc/{pid}/comm").read_text().strip()


def served(transport: Callable[..., SSHTransport]) -> tuple[int, int]:
    """(pid, parent pid) of the agent that answers a fresh connection's first call."""
    t = transport()
    pid = int(Agent(t).call("node.info")["pid"])
    parent = _ppid(pid)
    t.close()
    return pid, parent


def running_daemon(node: CloudletNode, transport: Callable[..., SSHTransport]) -> int:
    """The node's agent daemon, started by a first connection if none runs."""
    deadline = time.monotonic() + 10
    while True:
        _, parent = served(transport)
        if _comm(parent) == "nephele-agentd":
            return parent
        assert time.monotonic() < deadline, f"no agent daemon on {node.name} after 10 s"
        time.sleep(0.1)


def test_later_connections_are_served_by_the_node_daemon(
    node: CloudletNode, transport: Callable[..., SSHTransport]
) -> None:
    daemon = running_daemon(node, transport)
    assert (node.host_root / "run" / "agent-v1.sock").is_socket()
    children = set()
    for _ in range(3):
        pid, parent = served(transport)
        assert parent == daemon and _comm(pid) == "nephele-agent"
        children.add(pid)
        wait_gone(pid)  # the connection closed: its child ends, the daemon stays
    assert len(children) == 3 and Path(f"/proc/{daemon}").exists()


def test_a_killed_daemon_is_replaced(node: CloudletNode, transport: Callable[..., SSHTransport]) -> None:
    daemon = running_daemon(node, transport)
    os.kill(daemon, signal.SIGKILL)
    wait_gone(daemon)
    assert (node.host_root / "run" / "agent-v1.sock").exists()  # stale: nobody listens
    # socat cannot connect: the connection gets a `serve` of its own, which starts a new daemon.
    t = transport()
    pid = int(Agent(t).call("node.info")["pid"])
    assert cmdline(pid)[2:] == ["agent", "serve"] and _comm(_ppid(pid)) != "nephele-agentd"
    t.close()
    assert running_daemon(node, transport) != daemon


def test_new_code_on_the_node_replaces_the_daemon(
    node: CloudletNode, transport: Callable[..., SSHTransport]
) -> None:
    from nephele.agent import protocol

    daemon = running_daemon(node, transport)
    source = Path(protocol.__file__)
    st = source.stat()
    os.utime(source, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # as an upgrade would
    try:
        pid, _ = served(transport)
        # Served by a freshly started `serve` (the code now on disk), not by a child of the old daemon.
        assert _comm(pid) != "nephele-agent"
        wait_gone(daemon)
        assert running_daemon(node, transport) != daemon
    finally:
        os.utime(source, ns=(st.st_atime_ns, st.st_mtime_ns))
