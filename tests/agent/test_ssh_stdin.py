"""The request stream handed to fabric: invoke polls a non-TTY stdin one read() per 10 ms with a size of
1 byte, so a stream that honours the size makes a call cost ~10 ms per request byte."""

from invoke.terminals import bytes_to_read

from nephele.agent.ssh import _WholeRequest


def test_the_whole_request_goes_in_one_read_then_eof() -> None:
    body = '{"op": "handoff.send", "args": {"refs": ["' + "x" * 5000 + '"]}}\n'
    stream = _WholeRequest(body)
    assert bytes_to_read(stream) == 1  # what invoke will ask for
    assert stream.read(bytes_to_read(stream)) == body
    assert stream.read(1) == ""


def test_a_capped_transfer_keeps_to_its_rate() -> None:
    """_pump under a cap: the bytes so far never run ahead of the rate (a fake clock: the sleeps are
    the time), in chunks small enough that it holds over short stretches too."""
    import io

    from nephele.agent.ssh import _pump

    now = [0.0]
    sleeps: list[float] = []

    def sleep(s: float) -> None:
        sleeps.append(s)
        now[0] += s

    src, dst = io.BytesIO(bytes(5 << 20)), io.BytesIO()
    ticks: list[int] = []
    moved = _pump(src, dst, 0, lambda: ticks.append(dst.tell()), 8.0, clock=lambda: now[0], sleep=sleep)
    assert moved == 5 << 20 and dst.getvalue() == bytes(5 << 20)
    assert abs(now[0] - (5 << 20) * 8 / 8e6) < 0.2  # 5 MiB at 8 Mbit/s: ~5.2 s
    chunks = [b - a for a, b in zip([0, *ticks[:-1]], ticks, strict=True)]
    assert max(chunks) <= 100_000  # 0.1 s of the rate per chunk
    before = len(sleeps)
    uncapped = _pump(io.BytesIO(bytes(1 << 20)), io.BytesIO(), 0, lambda: None, None, sleep=sleep)
    assert uncapped == 1 << 20 and len(sleeps) == before  # uncapped: never waits
