"""nephele-client: argument parsing, host resolution and the original's printed formats (fake node)."""

from __future__ import annotations

import argparse
from typing import Any

import pytest

from nephele.agent import protocol
from nephele.agent.transport import FakeTransport
from nephele.cli import client
from nephele.errors import NepheleError, NotFound


def fake_node(results: dict[str, Any], seen: list[dict[str, Any]]) -> FakeTransport:
    def handler(req: protocol.Request) -> protocol.Response:
        seen.append(req)
        value = results[req["op"]]
        if isinstance(value, Exception):
            return protocol.error_response_for(req["id"], value)  # type: ignore[arg-type]
        return protocol.ok_response(req["id"], value)

    return FakeTransport(handler, node="edge-a")


def run_client(
    monkeypatch: pytest.MonkeyPatch, argv: list[str], results: dict[str, Any]
) -> list[dict[str, Any]]:
    seen: list[dict[str, Any]] = []
    monkeypatch.setattr(client, "transport_for", lambda args: fake_node(results, seen))
    assert client.main(argv) == 0
    return seen


def test_parse_host() -> None:
    assert client.parse_host("edge") == ("root", "edge", 22)
    assert client.parse_host("me@10.0.0.1:2222") == ("me", "10.0.0.1", 2222)
    with pytest.raises(NepheleError, match="port 'x'"):
        client.parse_host("h:x")


def test_run_prints_the_original_lines_and_sends_one_request(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    inst = {"title": "web", "uuid": "u-1", "ports": ["8080:80"]}
    seen = run_client(monkeypatch, ["edge-a", "run", "-p", "8080:80", "snap", "web"], {"instance.run": inst})
    assert [r["op"] for r in seen] == ["instance.run"]
    assert seen[0]["args"] == {"snapshot": "snap", "title": "web", "ports": "8080:80", "disk_only": False}
    out = capsys.readouterr().out.splitlines()
    assert out[:4] == ["HOST\t\tedge-a", "TITLE\t\tweb", "SNAPSHOT\tsnap", "FWDPORTS\t8080:80"]


def test_images_and_ps_tables(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    img = {"id": "0123456789ab", "name": "tiny", "source": "/src/tiny.json"}
    run_client(monkeypatch, ["h", "images"], {"image.ls": [img]})
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["IMAGE", "ID", "NAME", "SOURCE"]
    assert lines[1].split() == ["0123456789ab", "tiny", "/src/tiny.json"]
    inst = {
        "pid": 42, "title": "web", "ports": ["8080:80"], "uuid": "u" * 36, "state": "running",
        "started": "2026-11-26T12:00:00Z", "handoff_url": None,
    }  # fmt: skip
    run_client(monkeypatch, ["h", "ps"], {"instance.ls": [inst]})
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["PID", "TITLE", "PORTS", "UUID", "STATE", "STARTED", "HANDOFFURL"]
    assert lines[1].split() == ["42", "web", "8080:80", "u" * 36, "running", "2026-11-26T12:00:00Z"]


def test_remote_error_is_printed_with_node_and_exit_1(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    seen: list[dict[str, Any]] = []
    err = NotFound("no image 'x' on this node (`images` lists them)")
    monkeypatch.setattr(client, "transport_for", lambda args: fake_node({"image.export": err}, seen))
    assert client.main(["h", "image", "export", "x", "/tmp/x.zip"]) == 1
    assert capsys.readouterr().err == "error: node edge-a: no image 'x' on this node (`images` lists them)\n"


def test_unknown_cloudlet_node_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    from nephele.errors import CloudletError

    args = argparse.Namespace(host="edge-z", cloudlet="nosuchcloudlet", identity=None, timeout=None)
    with pytest.raises(CloudletError, match="no cloudlet named 'nosuchcloudlet'"):
        client.transport_for(args)


def test_handoff_passes_the_bandwidth_cap_timeout_and_auto_converge(monkeypatch: pytest.MonkeyPatch) -> None:
    got: dict[str, Any] = {}

    def fake_run_handoff(src: Any, dst: Any, title: str, spec: Any, **kw: Any) -> None:
        got.update(kw, title=title, dest=spec.address)

    import nephele.handoff.report as report

    monkeypatch.setattr(report, "run_handoff", fake_run_handoff)
    monkeypatch.setattr(client, "transport_for", lambda args: fake_node({}, []))
    argv = ["edge-a", "handoff", "web-1", "edge-b", "--bandwidth-mbit", "12.5"]
    assert client.main(argv) == 0
    assert got["title"] == "web-1" and got["bandwidth_mbit"] == 12.5
    assert (got["timeout_s"], got["auto_converge"]) == (None, True)
    assert client.main(["edge-a", "handoff", "web-1", "edge-b"]) == 0
    assert got["bandwidth_mbit"] is None
    # the give-up time and auto-converge; the global --timeout stays the node connection's
    argv = [
        "--timeout",
        "7",
        "edge-a",
        "handoff",
        "web-1",
        "edge-b",
        "--handoff-timeout",
        "90",
        "--no-auto-converge",
    ]
    assert client.main(argv) == 0
    assert (got["timeout_s"], got["auto_converge"]) == (90.0, False)
