"""The resident agent's loop (`nephele agent serve`, server.serve): many requests in one process, one
response line each, bad lines answered with a protocol error, progress kept on stderr, EOF / signal /
idle timeout ending it."""

from __future__ import annotations

import io
import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from nephele.agent import protocol
from nephele.agent.server import LineReader, _TooLong, resident_ops, serve
from nephele.node.runtime import NodeContext


@pytest.fixture(autouse=True)
def _env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("NEPHELE_ROOT", str(tmp_path / "root"))
    monkeypatch.setenv("NEPHELE_LIBVIRT_URI", "test:///default")
    # serve installs SIGTERM/SIGHUP handlers (it owns its process); give pytest's back.
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGHUP)}
    yield
    for s, h in saved.items():
        signal.signal(s, h)


def req(op: str, rid: str, **args: Any) -> bytes:
    return protocol.encode(protocol.make_request(op, args, request_id=rid))


def run_serve(data: bytes, **kw: Any) -> tuple[int, list[dict[str, Any]], str]:
    """serve() on `data` (then EOF); (exit status, hello + response lines, stderr)."""
    r, w = os.pipe()
    os.write(w, data)  # small inputs only: they must fit the pipe
    os.close(w)
    out, err = io.BytesIO(), io.StringIO()
    with os.fdopen(r, "rb") as stdin:
        rc = serve(stdin, out, err, **kw)
    return rc, [json.loads(line) for line in out.getvalue().splitlines()], err.getvalue()


calls: list[str] = []


def op_echo(ctx: NodeContext, args: dict[str, Any]) -> Any:
    calls.append("echo")
    return {"echo": args.get("x"), "pid": os.getpid()}


def op_chatty(ctx: NodeContext, args: dict[str, Any]) -> Any:
    for i in range(3):
        ctx.progress(f"step {i} of {args['n']}")
    print("a stray library print")  # must not reach the response stream
    return args["n"]


def op_fail(ctx: NodeContext, args: dict[str, Any]) -> Any:
    raise ValueError("boom")


def op_signalled(ctx: NodeContext, args: dict[str, Any]) -> Any:
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(5)  # the handler interrupts this
    return "not reached"


OPS = {"echo": op_echo, "chatty": op_chatty, "fail": op_fail, "signalled": op_signalled}


def test_many_requests_one_process_in_order() -> None:
    data = b"".join(req("echo", f"r{i}", x=i) for i in range(5))
    rc, lines, _ = run_serve(data, ops=OPS)
    assert rc == 0
    hello, *responses = lines
    assert hello["v"] == protocol.PROTOCOL_VERSION
    assert hello["serve"]["pid"] == os.getpid() and hello["serve"]["ops"] == sorted(OPS)
    assert [r["id"] for r in responses] == [f"r{i}" for i in range(5)]
    assert [r["result"]["echo"] for r in responses] == list(range(5))


def test_bad_lines_get_a_protocol_error_and_the_loop_goes_on() -> None:
    data = (
        b"not json\n"
        + b"\n"
        + b"[1, 2]\n"
        + b'{"v": 2, "id": "old", "op": "echo"}\n'
        + b'{"v": 1, "id": "noargs", "op": "echo", "args": [1]}\n'
        + b"\xff\xfe{\n"
        + req("echo", "ok", x="still here")
    )
    rc, lines, _ = run_serve(data, ops=OPS)
    assert rc == 0
    responses = lines[1:]
    assert len(responses) == 7
    for r in responses[:6]:
        assert r["ok"] is False and r["error"]["kind"] == "protocol", r
    assert [r["id"] for r in responses[:6]] == [None, None, None, "old", "noargs", None]
    assert "version 2" in responses[3]["error"]["message"]
    assert responses[6] == protocol.ok_response("ok", {"echo": "still here", "pid": os.getpid()})


def test_ops_it_does_not_serve_are_refused_unrun() -> None:
    calls.clear()
    data = req("image.build", "b", path="/x") + req("no.such.op", "n") + req("echo", "e")
    rc, lines, _ = run_serve(data, ops={"echo": op_echo})
    assert rc == 0
    build, unknown, echo = lines[1:]
    assert build["error"]["kind"] == "unsupported" and "agent call" in build["error"]["message"]
    assert (
        unknown["error"]["kind"] == "unsupported" and "unknown op 'no.such.op'" in unknown["error"]["message"]
    )
    assert echo["ok"] is True and calls == ["echo"]


def test_an_op_error_is_answered_and_the_loop_goes_on() -> None:
    rc, lines, _ = run_serve(req("fail", "f") + req("echo", "e", x=1), ops=OPS)
    assert rc == 0
    fail, echo = lines[1:]
    assert fail["error"]["kind"] == "internal" and "ValueError: boom" in fail["error"]["message"]
    assert echo["ok"] is True


def test_progress_and_prints_stay_on_stderr_in_order() -> None:
    data = req("chatty", "c1", n=1) + req("echo", "e") + req("chatty", "c2", n=2)
    rc, lines, err = run_serve(data, ops=OPS)
    assert rc == 0
    assert [r.get("id") for r in lines] == [None, "c1", "e", "c2"]  # hello first, nothing else
    assert [r["result"] for r in (lines[1], lines[3])] == [1, 2]
    want = [*(f"step {i} of 1" for i in range(3)), "a stray library print"]
    want += [*(f"step {i} of 2" for i in range(3)), "a stray library print"]
    assert err.splitlines() == want


def test_eof_ends_it_and_a_last_line_without_newline_is_answered() -> None:
    rc, lines, _ = run_serve(req("echo", "a").rstrip(b"\n"), ops=OPS)
    assert rc == 0 and [r["id"] for r in lines[1:]] == ["a"]
    rc, lines, _ = run_serve(b"", ops=OPS)
    assert rc == 0 and len(lines) == 1  # the hello only


def test_a_signal_during_an_op_answers_interrupted_and_stops() -> None:
    rc, lines, _ = run_serve(req("signalled", "s") + req("echo", "never"), ops=OPS)
    assert rc == 0
    assert [r["id"] for r in lines[1:]] == ["s"]
    assert lines[1]["error"]["kind"] == "interrupted"


def test_the_real_resident_ops_answer() -> None:
    assert set(resident_ops()) == protocol.RESIDENT_OPS
    data = req("ping", "p") + req("observe", "o", node="n1") + req("image.ls", "i") + req("instance.ls", "l")
    rc, lines, _ = run_serve(data)
    assert rc == 0
    ping, obs, images, instances = lines[1:]
    assert ping["result"]["pong"] is True
    assert obs["result"] == {"reachable": True, "images": {}, "snapshots": {}, "instances": {}}
    assert images["result"] == [] and instances["result"] == []


def test_line_reader_chunks_limits_and_timeout() -> None:
    r, w = os.pipe()
    try:
        reader = LineReader(r, limit=10)
        os.write(w, b"ab")
        with pytest.raises(TimeoutError):
            reader.readline(0.05)  # half a line is not a line
        os.write(w, b"c\nde")
        assert reader.readline(1) == b"abc"
        os.write(w, b"f\n" + b"x" * 25)
        assert reader.readline(1) == b"def"
        assert reader.readline(1) is _TooLong
        os.write(w, b"x" * 30 + b"\nok\n")  # the rest of the long line is skipped
        assert reader.readline(1) == b"ok"
        os.write(w, b"last")
        os.close(w)
        w = -1
        assert reader.readline(1) == b"last"
        assert reader.readline(1) is None
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)


# --------------------------------------------------------------------------- the real command


def agent_serve(*extra: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "nephele", "agent", "serve", *extra],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def read_line(proc: subprocess.Popen[bytes], timeout: float = 30) -> dict[str, Any]:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    assert ready, "no line from the agent"
    return dict(json.loads(proc.stdout.readline()))


def test_agent_serve_answers_each_line_as_it_comes_then_ends_at_eof() -> None:
    proc = agent_serve()
    assert proc.stdin is not None
    try:
        hello = read_line(proc)
        assert hello["serve"]["pid"] == proc.pid
        assert set(hello["serve"]["ops"]) == protocol.RESIDENT_OPS
        for i in range(3):  # one at a time: each answer comes before the next request is sent
            proc.stdin.write(req("node.info", f"n{i}"))
            proc.stdin.flush()
            answer = read_line(proc)
            assert answer["id"] == f"n{i}" and answer["result"]["pid"] == proc.pid
        proc.stdin.close()
        assert proc.wait(timeout=30) == 0
    finally:
        proc.kill()
        proc.wait()


def test_agent_serve_stops_on_sigterm_and_after_its_idle_timeout() -> None:
    proc = agent_serve()
    try:
        read_line(proc)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        proc.kill()
        proc.wait()
    proc = agent_serve("--idle-timeout", "0.5")
    try:
        read_line(proc)
        t0 = time.monotonic()
        assert proc.wait(timeout=30) == 0
        assert time.monotonic() - t0 < 10
    finally:
        proc.kill()
        proc.wait()


def test_resident_ops_start_no_process_thread_or_signal_handler(monkeypatch: pytest.MonkeyPatch) -> None:
    # What makes an op safe in a long-lived process (protocol.RESIDENT_OPS), checked on an empty node.
    started: list[Any] = []
    handlers: list[int] = []
    real_popen_init = subprocess.Popen.__init__
    real_signal = signal.signal

    def popen_init(self: Any, *a: Any, **kw: Any) -> None:
        started.append(a[0] if a else kw.get("args"))
        real_popen_init(self, *a, **kw)

    def set_handler(sig: int, handler: Any) -> Any:
        handlers.append(sig)
        return real_signal(sig, handler)

    monkeypatch.setattr(subprocess.Popen, "__init__", popen_init)
    monkeypatch.setattr(signal, "signal", set_handler)
    threads_before = {t.name for t in threading.enumerate()}
    data = b"".join(req(op, op) for op in sorted(protocol.RESIDENT_OPS))
    rc, lines, _ = run_serve(data)
    assert rc == 0
    assert all(r["ok"] for r in lines[1:]), lines
    assert started == []
    assert sorted(handlers) == sorted([signal.SIGTERM, signal.SIGHUP])  # serve's own, once
    new_threads = {t.name for t in threading.enumerate()} - threads_before
    assert new_threads <= {"libvirt-events"}  # libvirt's event loop: one per process, by design
