"""Cloudlet pieces that need no namespace or daemon: argument parsing, inventory round trip, input checks,
and the TCP delay proxy on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from pathlib import Path

import pytest

from nephele.cloudlet import Cloudlet, parse_delay_ms, parse_rate_mbit
from nephele.cloudlet.core import _tbf_args
from nephele.cloudlet.delayproxy import main as proxy_main
from nephele.cloudlet.delayproxy import serve
from nephele.errors import CloudletError


@pytest.mark.parametrize(
    ("text", "mbit"), [("20mbit", 20), ("1gbit", 1000), ("500kbit", 0.5), ("7.5", 7.5), (3, 3), ("2M", 2)]
)
def test_parse_rate(text: str, mbit: float) -> None:
    assert parse_rate_mbit(text) == pytest.approx(mbit)


@pytest.mark.parametrize("text", ["fast", "20mbps", "-1mbit", "0", ""])
def test_parse_rate_rejects(text: str) -> None:
    with pytest.raises(CloudletError, match="rate"):
        parse_rate_mbit(text)


@pytest.mark.parametrize(("text", "ms"), [("20ms", 20), ("0.5s", 500), ("0", 0), ("15", 15)])
def test_parse_delay(text: str, ms: float) -> None:
    assert parse_delay_ms(text) == pytest.approx(ms)


@pytest.mark.parametrize("text", ["soon", "20us", "11s"])
def test_parse_delay_rejects(text: str) -> None:
    with pytest.raises(CloudletError, match="delay"):
        parse_delay_ms(text)


def test_tbf_burst_grows_with_rate() -> None:
    assert _tbf_args(20)[:3] == ["tbf", "rate", "20000kbit"]
    assert int(_tbf_args(20)[4]) == 32 * 1024
    assert int(_tbf_args(1000)[4]) > 32 * 1024


@pytest.mark.parametrize(
    ("kw", "msg"),
    [
        ({"name": "Bad_Name"}, "cloudlet name"),
        ({"name": "waytoolongname"}, "cloudlet name"),
        ({"nodes": 0}, "--nodes"),
        ({"nodes": 17}, "--nodes"),
        ({"rate_mbit": "x"}, "rate"),
    ],
)
def test_up_rejects_bad_input_before_touching_anything(
    kw: dict[str, object], msg: str, tmp_path: Path
) -> None:
    args: dict[str, object] = {"name": "ok", "nodes": 1, "workdir": tmp_path, **kw}
    with pytest.raises(CloudletError, match=msg):
        Cloudlet.up(**args)  # type: ignore[arg-type]
    assert list(tmp_path.iterdir()) == []


def test_load_unknown_cloudlet_names_it(tmp_path: Path) -> None:
    with pytest.raises(CloudletError, match=r"no cloudlet named 'nosuch'.*cloudlet up --name nosuch"):
        Cloudlet.load("nosuch", tmp_path)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "cloudlet.json").write_text("{not json")
    with pytest.raises(CloudletError, match="unreadable cloudlet inventory"):
        Cloudlet.load("broken", tmp_path)


def test_inventory_round_trip() -> None:
    data = {
        "version": 1,
        "name": "x",
        "dir": "/w/x",
        "subnet": "10.201.0.0/24",
        "bridge": "nphl-x",
        "bridge_address": "10.201.0.254",
        "rate_mbit": 20.0,
        "delay_ms": 20.0,
        "ssh_key": "/w/x/ssh/id",
        "known_hosts": "/w/x/ssh/kh",
        "nephele_bin": "/v/bin/nephele",
        "python": "/v/bin/python",
        "owner_pid": None,
        "nodes": [
            {
                "name": "edge-a",
                "index": 1,
                "address": "10.201.0.1",
                "netns": "nphl-x-1",
                "root": "/var/nephele",
                "host_root": "/w/x/nodes/edge-a/root",
                "host_dir": "/w/x/nodes/edge-a",
                "libvirt_uri": "qemu:///system?socket=/w/x/nodes/edge-a/libvirt/run/libvirt-sock",
                "libvirt_uri_on_node": "qemu:///system",
                "libvirt_tcp_uri": "qemu+tcp://10.201.0.1/system",
                "ssh_user": "root",
                "ssh_port": 22,
                "ssh_key": "/w/x/ssh/id",
                "known_hosts": "/w/x/ssh/kh",
                "mnt_ns": "/w/x/nphl-ns/edge-a.mnt",
                "uts_ns": "/w/x/nphl-ns/edge-a.uts",
                "host_veth": "nv1-x",
            }
        ],
    }
    c = Cloudlet.from_dict(data)
    assert c.to_dict() == data
    assert "edge-a: {address: 10.201.0.1, ssh: {user: root, port: 22" in c.manifest_nodes()
    assert c.nodes[0].ssh_command("hostname")[-2:] == ["root@10.201.0.1", "hostname"]
    (spec,) = c.node_specs()
    assert (spec.name, spec.address, spec.ssh_key, spec.root, spec.link_mbit) == (
        "edge-a",
        "10.201.0.1",
        "/w/x/ssh/id",
        "/var/nephele",
        20.0,
    )
    with pytest.raises(CloudletError, match="no node 'edge-z'"):
        c.node("edge-z")


# ------------------------------------------------------------------------------------------- delay proxy


async def _echo_server() -> tuple[asyncio.AbstractServer, int]:
    async def echo(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        while data := await r.read(65536):
            w.write(data)
            await w.drain()
        w.write_eof()
        w.close()

    srv = await asyncio.start_server(echo, "127.0.0.1", 0)
    return srv, srv.sockets[0].getsockname()[1]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_delay_proxy_delays_each_direction_and_keeps_bytes() -> None:
    async def scenario() -> tuple[float, bytes, bytes]:
        srv, port = await _echo_server()
        pport = _free_port()
        proxy = asyncio.ensure_future(
            serve(("127.0.0.1", pport), ("127.0.0.1", port), 50, max_buffer=64 * 1024)
        )
        await asyncio.sleep(0.2)
        try:
            r, w = await asyncio.open_connection("127.0.0.1", pport)
            t = time.monotonic()
            w.write(b"ping")
            await w.drain()
            pong = await r.readexactly(4)
            rtt = time.monotonic() - t
            # 2 MiB through a 64 KiB bounded delay line, both ways, then a half-close travels through.
            blob = os.urandom(2 << 20)

            async def send() -> None:
                w.write(blob)
                await w.drain()
                w.write_eof()

            sender = asyncio.ensure_future(send())
            back = await asyncio.wait_for(r.read(-1), 30)
            await sender
            w.close()
            return rtt, pong + back, b"ping" + blob
        finally:
            proxy.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await proxy
            srv.close()

    rtt, got, want = asyncio.run(scenario())
    assert got == want
    assert 0.095 < rtt < 1.0, f"RTT through a 50 ms each-way proxy: {rtt * 1000:.0f} ms"


def test_delay_proxy_refused_target_closes_client() -> None:
    async def scenario() -> bytes:
        pport, dead = _free_port(), _free_port()
        proxy = asyncio.ensure_future(serve(("127.0.0.1", pport), ("127.0.0.1", dead), 10))
        await asyncio.sleep(0.2)
        try:
            r, w = await asyncio.open_connection("127.0.0.1", pport)
            data = await asyncio.wait_for(r.read(-1), 5)
            w.close()
            return data
        finally:
            proxy.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await proxy

    assert asyncio.run(scenario()) == b""


def test_delay_proxy_cli_rejects_bad_address(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        proxy_main(["nohost", "127.0.0.1:1"])
    assert "is not HOST:PORT" in capsys.readouterr().err


def test_fixture_prerequisites_fail_loudly_never_skip(monkeypatch: pytest.MonkeyPatch) -> None:
    from support import require

    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(pytest.fail.Exception, match=r"must run as root.*'no-such-tool-x' not found"):
        require(tools=("no-such-tool-x",))
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    require(tools=("sh",))  # all present: no failure
