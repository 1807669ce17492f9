"""Fuzz the agent protocol: `protocol.decode` / `validate_request` / `result_of` on random and mutated
input, and `serve_one` end to end (the node side of every controller call) on arbitrary stdin bytes
with a throw-away node root.

What must hold: the controller side raises only ProtocolError/RemoteError (with a message); the node
side always writes exactly one well-formed response line and never raises, whatever the bytes; its
errors carry a documented kind and a message; nothing is written outside the throw-away root (the
working directory is a watched directory inside the sandbox); no staging directory is left behind.
"""

from __future__ import annotations

import io
import json
import logging
import os
import signal
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import event, given
from hypothesis import strategies as st

from nephele.agent import protocol
from nephele.agent.server import serve_one
from nephele.errors import AgentError, ProtocolError, RemoteError
from nephele.handoff.ops import HANDOFF_OPS
from nephele.node.ops import OPS
from tests.fuzz.budget import fuzz, no_hang

# Ops that wait for something outside the request by design are left out: a build waits for a human to
# pause the VM, a handoff send/receive for its peer. Every other op runs against the test hypervisor.
WAITING_OPS = {"image.build", "snapshot.build", "handoff.send", "handoff.receive"}
FUZZ_OPS = sorted((set(OPS) | set(HANDOFF_OPS)) - WAITING_OPS)
ARG_KEYS = [
    "path", "id", "name", "dest", "instance", "snapshot", "title", "ports", "lines", "image", "uuid",
    "force", "timeout", "node", "hypervisor", "handoff_id", "token", "port", "address", "url", "prune",
    "manifest", "disk_only", "kernel", "initrd", "cmdline", "cpus", "memory_kib", "refs", "state",
]  # fmt: skip
KINDS = {*protocol.ERROR_KINDS, "interrupted"}
# Ops whose argument checking lives outside this suite's scope and is known to let a wrongly typed
# argument through as an `internal` error (still a well-formed error response, never a crash). Listed in
# docs/fuzzing.md; any other op answering `internal` fails the run.
KNOWN_INTERNAL: dict[str, str] = {}  # op -> why it may answer `internal` (none left)

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20)
    | st.sampled_from(
        [
            "", ".", "..", "/", "tiny", "web", "8080:80", "http", "-1", "0" * 12, "ffff0000",
            "00112233445566778899aabbccddeeff", "../../etc", "{{SANDBOX}}/junk", "{{SANDBOX}}/junk.zip",
            "{{SANDBOX}}/dir", "{{SANDBOX}}/missing.zip", "{{ROOT}}/tmp", "{{ROOT}}/images", "x\x00y",
        ]
    )
)  # fmt: skip
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


@st.composite
def requests(draw: st.DrawFn) -> dict[str, Any]:
    args = draw(st.fixed_dictionaries({}, optional={k: json_values for k in ARG_KEYS}))
    # Mostly well-formed envelopes (so the ops run), sometimes a broken one.
    # (hypothesis favours small draws: the common case is the large one)
    odd = draw(st.integers(0, 9)) == 9
    req: dict[str, Any] = {
        "v": draw(st.sampled_from([2, 0, "1", None, 1.0])) if odd else 1,
        "id": draw(json_values) if draw(st.booleans()) else "abc",
        "op": draw(st.text(max_size=12) | json_values)
        if draw(st.integers(0, 9)) == 9
        else draw(st.sampled_from(FUZZ_OPS)),
        "args": draw(json_values) if odd else args,
    }
    if odd and draw(st.booleans()):
        del req[draw(st.sampled_from(["v", "id", "op", "args"]))]
    return req


def _mutate(draw: st.DrawFn, data: bytes) -> bytes:
    buf = bytearray(data)
    for _ in range(draw(st.integers(0, 3))):
        op = draw(st.sampled_from(["flip", "insert", "delete", "truncate", "splice", "nest", "append"]))
        i = draw(st.integers(0, len(buf)))
        if op == "flip" and buf:
            i = min(i, len(buf) - 1)
            buf[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "insert":
            buf[i:i] = draw(
                st.binary(min_size=1, max_size=6) | st.sampled_from([b"{", b"[", b'"', b"\\u", b"\n"])
            )
        elif op == "delete":
            del buf[i : i + draw(st.integers(1, 8))]
        elif op == "truncate":
            del buf[i:]
        elif op == "splice":
            j = draw(st.integers(0, len(buf)))
            buf[i:i] = buf[j : j + draw(st.integers(1, 40))]
        elif op == "nest":  # deep nesting: recursion in the JSON parser
            depth = draw(st.sampled_from([10, 1000, 100_000]))
            buf[i:i] = b"[" * depth + b"]" * draw(st.sampled_from([0, depth]))
        else:
            buf += draw(st.sampled_from([b"\n", b"\n{}", b" trailing", b"\x00" * 3, b"\n" + bytes(buf)]))
    return bytes(buf)


@st.composite
def request_bytes(draw: st.DrawFn) -> bytes:
    """What a controller (or an attacker with the node's SSH key) could put on the agent's stdin."""
    choice = draw(st.integers(0, 9))
    if choice == 9:
        return draw(st.binary(max_size=200))
    if choice == 8:
        return draw(st.text(max_size=100)).encode("utf-8", "surrogatepass")
    req = draw(requests())
    data = json.dumps(req, allow_nan=True).encode()
    return _mutate(draw, data) if draw(st.integers(0, 3)) == 3 else data


@fuzz(200)
@given(request_bytes())
def test_decode_and_validate(data: bytes) -> None:
    with no_hang():
        try:
            message = protocol.decode(data, what="request", node="n1")
        except ProtocolError as exc:
            assert str(exc).startswith("node n1: ") and len(str(exc)) > len("node n1: ")
            return
        assert isinstance(message, dict)
        try:
            _rid, op, args = protocol.validate_request(message)
        except ProtocolError as exc:
            assert str(exc)
            return
        assert isinstance(op, str) and op and isinstance(args, dict)


@st.composite
def responses(draw: st.DrawFn) -> bytes:
    resp: dict[str, Any] = {"v": 1, "id": "r1"}
    if draw(st.booleans()):
        resp.update(ok=True, result=draw(json_values))
    else:
        error = draw(
            st.fixed_dictionaries(
                {"kind": st.sampled_from(protocol.ERROR_KINDS) | json_values, "message": json_values},
                optional={"temporary": json_values},
            )
            | json_values
        )
        resp.update(ok=draw(st.sampled_from([False, 0, None, "false"])), error=error)
    for key in draw(st.lists(st.sampled_from(list(resp)), max_size=2)):
        resp[key] = draw(json_values)
    return _mutate(draw, json.dumps(resp, allow_nan=True).encode())


@fuzz(300)
@given(responses())
def test_controller_reads_any_response(data: bytes) -> None:
    """The controller side: any answer is a result, a RemoteError or a ProtocolError naming the node."""
    with no_hang():
        try:
            response = protocol.decode(data, what="the agent's response", node="n1")
            protocol.result_of(response, {"id": "r1"}, node="n1")
        except (ProtocolError, RemoteError) as exc:
            assert isinstance(exc, AgentError) and exc.node == "n1" and str(exc).startswith("node n1: ")


# ------------------------------------------------------------------------------ serve_one end to end


@pytest.fixture(autouse=True)
def _keep_signal_handlers() -> Iterator[None]:
    # serve_one installs SIGTERM/SIGHUP handlers (it owns its process); give pytest's back.
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGHUP)}
    yield
    for s, h in saved.items():
        signal.signal(s, h)


@pytest.fixture(autouse=True)
def _quiet_node_log() -> Iterator[None]:
    # Every request logs a line; pytest capturing thousands of them costs more than the fuzzing.
    log = logging.getLogger("nephele.node")
    saved, log.propagate = log.propagate, False
    yield
    log.propagate = saved


def _tree(path: Path) -> set[str]:
    return {str(p.relative_to(path)) for p in path.rglob("*")}


def _serve(data: bytes, sandbox: Path) -> tuple[int, bytes, str]:
    stdin, stdout, stderr = io.BytesIO(data), io.BytesIO(), io.StringIO()
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        with no_hang():
            rc = serve_one(stdin, stdout, stderr)
    finally:
        for s, h in saved.items():
            signal.signal(s, h)
    return rc, stdout.getvalue(), stderr.getvalue()


def check_serve(data: bytes, *, allow_internal: bool = False) -> None:
    with tempfile.TemporaryDirectory(prefix="nephele-fuzz-agent-") as d:
        sandbox = Path(d)
        root, cwd = sandbox / "root", sandbox / "cwd"
        cwd.mkdir()
        (sandbox / "junk").write_bytes(b"not an image\n" * 10)
        (sandbox / "junk.zip").write_bytes(b"PK\x03\x04" + b"\x00" * 60)
        (sandbox / "dir").mkdir()
        text = data.decode("latin-1").replace("{{SANDBOX}}", d).replace("{{ROOT}}", str(root))
        data = text.encode("latin-1")
        before = _tree(sandbox)
        env = {"NEPHELE_ROOT": str(root), "NEPHELE_LIBVIRT_URI": "test:///default"}
        old_env = {k: os.environ.get(k) for k in env}
        old_cwd = os.getcwd()
        os.environ.update(env)
        os.chdir(cwd)
        try:
            rc, out, _err = _serve(data, sandbox)
        finally:
            os.chdir(old_cwd)
            for k, v in old_env.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        assert rc == 0
        assert out.endswith(b"\n") and out.count(b"\n") == 1, out
        response = json.loads(out)
        assert response["v"] == protocol.PROTOCOL_VERSION and isinstance(response["ok"], bool)
        event("ok" if response["ok"] else f"error {response['error'].get('kind')}")
        if not response["ok"]:
            err = response["error"]
            assert err["kind"] in KINDS and isinstance(err["message"], str) and err["message"], err
            # `internal` is the agent's catch-all for an exception nobody meant: a bug to fix.
            assert err["kind"] != "internal" or allow_internal, err["message"]
        # Nothing created or removed outside the node root; no staging left in tmp/.
        after = _tree(sandbox)
        outside = {p for p in after ^ before if not p.startswith("root")}
        assert not outside, outside
        assert not (root / "tmp").exists() or list((root / "tmp").iterdir()) == []


@fuzz(120)
@given(request_bytes())
def test_serve_one_answers_any_bytes(data: bytes) -> None:
    try:
        op = json.loads(data).get("op")
    except (ValueError, AttributeError, RecursionError):
        op = None
    check_serve(data, allow_internal=isinstance(op, str) and op in KNOWN_INTERNAL)


@pytest.mark.parametrize("op", FUZZ_OPS)
@fuzz(8)
@given(data=st.data())
def test_serve_one_each_op(op: str, data: st.DataObject) -> None:
    req = data.draw(requests())
    req["op"] = op
    check_serve(json.dumps(req, allow_nan=True).encode(), allow_internal=req.get("op") in KNOWN_INTERNAL)


def test_oversized_request_is_refused_without_reading_it_all(tmp_path: Path) -> None:
    big = b'{"v":1,"id":"x","op":"ping","args":{"pad":"' + b"x" * (protocol.MAX_MESSAGE + 10) + b'"}}'
    rc, out, _ = _serve(big, tmp_path)
    response = json.loads(out)
    assert rc == 0 and response["ok"] is False and response["error"]["kind"] == "protocol"
    assert "larger than" in response["error"]["message"]


def test_handoff_cleanup_stays_inside_the_node_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Found by `make fuzz` (serve_one with random arguments): handoff.cleanup joins its `uuid` argument
    onto <root>/instances/ unchecked and removes what it names. {"uuid": "../images"} removes every image
    of the node; "../.." would remove the directory holding the node root (/var for /var/nephele); an
    absolute path removes that path. Owned by nephele/handoff/dest.py (cleanup) and
    nephele/node/store.py (instance_dir): this test fails until a uuid is checked to be one."""
    monkeypatch.setenv("NEPHELE_LIBVIRT_URI", "test:///default")
    root = tmp_path / "root"
    image = root / "images" / ("ab" * 32)
    image.mkdir(parents=True)
    (image / "meta.json").write_text("{}")
    outside = tmp_path / "precious"
    outside.mkdir()
    for uuid in ("../images", str(outside)):
        request = {"v": 1, "id": "x", "op": "handoff.cleanup", "args": {"root": str(root), "uuid": uuid}}
        _serve(json.dumps(request).encode(), tmp_path)
    assert image.is_dir(), "handoff.cleanup removed the node's images"
    assert outside.is_dir(), "handoff.cleanup removed a directory outside the node root"


@pytest.mark.parametrize("op", [op for op in FUZZ_OPS if op != "handoff.cleanup"])
def test_no_op_follows_a_path_argument_out_of_the_root(
    op: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every argument set to a path that leads out of instances/ (or out of the root): nothing outside
    the object the op manages may disappear. (handoff.cleanup: the test above.)"""
    monkeypatch.setenv("NEPHELE_LIBVIRT_URI", "test:///default")
    root = tmp_path / "root"
    image = root / "images" / ("ab" * 32)
    image.mkdir(parents=True)
    (image / "meta.json").write_text("{}")
    outside = tmp_path / "precious"
    outside.mkdir()
    (outside / "file").write_text("keep")
    for value in ("../images", "../..", str(outside), str(outside / "file")):
        args = {key: value for key in ARG_KEYS if key not in ("lines", "port", "timeout", "cpus")}
        request = {"v": 1, "id": "x", "op": op, "args": {**args, "root": str(root)}}
        _rc, out, _ = _serve(json.dumps(request).encode(), tmp_path)
        assert out.count(b"\n") == 1
        assert image.is_dir() and outside.is_dir() and (outside / "file").is_file(), (op, value)
