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
