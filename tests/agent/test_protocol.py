"""The agent protocol: envelopes, versioning, typed errors, transports, fan-out."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from nephele.agent import protocol
from nephele.agent.client import Agent, fan_out
from nephele.agent.server import handle
from nephele.agent.transport import FakeTransport, LocalTransport
from nephele.errors import NodeUnreachable, NotFound, ProtocolError, RemoteError


def echo_ops() -> dict[str, Any]:
    def echo(ctx: Any, args: dict[str, Any]) -> Any:
        return {"args": args, "root": str(ctx.store.root)}

    def missing(ctx: Any, args: dict[str, Any]) -> Any:
        raise NotFound("no image 'x' on this node")

    def boom(ctx: Any, args: dict[str, Any]) -> Any:
        raise ZeroDivisionError("division by zero")

    return {"echo": echo, "missing": missing, "boom": boom}


def server(tmp_path: Path) -> FakeTransport:
    def handler(req: protocol.Request) -> protocol.Response:
        req = {**req, "args": {**req["args"], "root": str(tmp_path)}}
        return handle(json.loads(protocol.encode(req)), ops=echo_ops())

    return FakeTransport(handler, node="n1")


def test_round_trip_result(tmp_path: Path) -> None:
    agent = Agent(server(tmp_path))
    assert agent.call("echo", {"a": [1, 2]}) == {"args": {"a": [1, 2]}, "root": str(tmp_path)}


def test_node_error_becomes_remote_error_with_kind(tmp_path: Path) -> None:
    with pytest.raises(RemoteError) as ei:
        Agent(server(tmp_path)).call("missing")
    assert ei.value.kind == "not_found"
    assert ei.value.node == "n1"
    assert str(ei.value) == "node n1: no image 'x' on this node"
    assert not ei.value.temporary


def test_unexpected_exception_is_internal_and_logged(tmp_path: Path) -> None:
    with pytest.raises(RemoteError) as ei:
        Agent(server(tmp_path)).call("boom")
    assert ei.value.kind == "internal"
    assert "ZeroDivisionError" in str(ei.value)
    assert "Traceback" in (tmp_path / "nephele.log").read_text()


def test_unknown_op_is_unsupported(tmp_path: Path) -> None:
    with pytest.raises(RemoteError) as ei:
        Agent(server(tmp_path)).call("frobnicate")
    assert ei.value.kind == "unsupported"
    assert "echo" in str(ei.value)


def test_request_version_mismatch_is_refused_by_the_node() -> None:
    resp = handle({"v": 2, "id": "x", "op": "echo", "args": {}}, ops=echo_ops())
    assert resp["ok"] is False and resp["error"]["kind"] == "protocol"
    assert "version 2" in resp["error"]["message"]


def test_response_version_mismatch_is_protocol_error() -> None:
    def newer(req: protocol.Request) -> protocol.Response:
        return {"v": 2, "id": req["id"], "ok": True, "result": {}}

    with pytest.raises(ProtocolError, match=r"version 2.*speaks 1"):
        Agent(FakeTransport(newer)).call("echo")


@pytest.mark.parametrize(
    "resp",
    [
        {"v": 1, "id": "WRONG", "ok": True, "result": 1},
        {"v": 1, "ok": "yes"},
        {"v": 1, "ok": False, "error": "bad"},
    ],
)
def test_malformed_responses_are_protocol_errors(resp: dict[str, Any]) -> None:
    def handler(req: protocol.Request) -> protocol.Response:
        return {**resp, "id": resp.get("id", req["id"])}

    with pytest.raises(ProtocolError):
        Agent(FakeTransport(handler)).call("echo")


def test_decode_rejects_garbage() -> None:
    with pytest.raises(ProtocolError, match="not JSON"):
        protocol.decode(b"Traceback (most recent call last)", what="response")
    with pytest.raises(ProtocolError, match="not a JSON object"):
        protocol.decode(b"[1]", what="response")
    with pytest.raises(ProtocolError, match="empty"):
        protocol.decode(b"  \n", what="response")


def test_fan_out_returns_results_and_errors_per_node(tmp_path: Path) -> None:
    good = server(tmp_path)

    def down(req: protocol.Request) -> protocol.Response:
        raise NodeUnreachable("connection refused", node="b")

    def slow(req: protocol.Request) -> protocol.Response:
        time.sleep(3)
        return protocol.ok_response(req["id"], "late")

    t0 = time.monotonic()
    out = fan_out(
        {"a": good, "b": FakeTransport(down, "b"), "c": FakeTransport(slow, "c"), "d": server(tmp_path)},
        "echo",
        {"k": 1},
        timeout=1.0,
    )
    assert time.monotonic() - t0 < 2.5  # the slow node does not hold the others up
    assert list(out) == ["a", "b", "c", "d"]
    a, d = out["a"], out["d"]
    assert isinstance(a, dict) and isinstance(d, dict)
    assert a["args"] == {"k": 1} and d["args"] == {"k": 1}
    assert isinstance(out["b"], NodeUnreachable) and out["b"].temporary
    assert isinstance(out["c"], NodeUnreachable) and "within 1 s" in str(out["c"])


def test_fan_out_runs_in_parallel(tmp_path: Path) -> None:
    def slow(req: protocol.Request) -> protocol.Response:
        time.sleep(0.5)
        return protocol.ok_response(req["id"], 1)

    t0 = time.monotonic()
    out = fan_out({f"n{i}": FakeTransport(slow, f"n{i}") for i in range(6)}, "x", timeout=10)
    assert time.monotonic() - t0 < 1.5
    assert out == {f"n{i}": 1 for i in range(6)}


# ------------------------------------------------------------------------ LocalTransport, for real


def local(tmp_path: Path) -> LocalTransport:
    return LocalTransport("here", env={"NEPHELE_ROOT": str(tmp_path)}, timeout=60)


def test_local_transport_runs_the_real_agent(tmp_path: Path) -> None:
    result = Agent(local(tmp_path)).call("ping")
    assert result == {"pong": True, "nephele": "0.1.0", "root": str(tmp_path)}
    assert (tmp_path / "images").is_dir() and (tmp_path / "nephele.log").exists()


def test_local_transport_typed_error_from_real_agent(tmp_path: Path) -> None:
    with pytest.raises(RemoteError) as ei:
        Agent(local(tmp_path)).call("image.export", {"id": "deadbeef", "dest": str(tmp_path / "x.zip")})
    assert ei.value.kind == "not_found"
    assert "no image 'deadbeef'" in str(ei.value)
    assert not (tmp_path / "x.zip").exists()


def test_local_transport_streams_progress_lines(tmp_path: Path) -> None:
    script = tmp_path / "agent.py"
    script.write_text(
        "import sys, json\n"
        "req = json.loads(sys.stdin.read())\n"
        "for i in range(3): print(f'step {i}', file=sys.stderr, flush=True)\n"
        "print(json.dumps({'v': 1, 'id': req['id'], 'ok': True, 'result': 'done'}))\n"
    )
    lines: list[str] = []
    t = LocalTransport("p", command=[sys.executable, str(script)])
    assert Agent(t).call("x", progress=lines.append) == "done"
    assert lines == ["step 0", "step 1", "step 2"]


def test_local_transport_timeout_is_unreachable(tmp_path: Path) -> None:
    t = LocalTransport("slow", command=[sys.executable, "-c", "import time; time.sleep(30)"])
    t0 = time.monotonic()
    with pytest.raises(NodeUnreachable, match=r"within 0\.5 s"):
        Agent(t).call("x", timeout=0.5)
    assert time.monotonic() - t0 < 5


def test_local_transport_crash_without_response_is_protocol_error(tmp_path: Path) -> None:
    t = LocalTransport("bad", command=[sys.executable, "-c", "import sys; sys.exit('agent exploded')"])
    with pytest.raises(ProtocolError, match="agent exploded"):
        Agent(t).call("x", progress=lambda _: None)


def test_local_transport_missing_agent_is_unreachable() -> None:
    t = LocalTransport("gone", command=["/nonexistent/nephele-agent"])
    with pytest.raises(NodeUnreachable, match="cannot start"):
        Agent(t).call("x")


def test_agent_call_cli_answers_bad_json_in_band(tmp_path: Path) -> None:
    import subprocess

    proc = subprocess.run(
        [sys.executable, "-m", "nephele", "agent", "call"],
        input=b"{not json",
        capture_output=True,
        env={**os.environ, "NEPHELE_ROOT": str(tmp_path)},
        check=False,
    )
    resp = json.loads(proc.stdout)
    assert proc.returncode == 0
    assert resp["ok"] is False and resp["error"]["kind"] == "protocol"
