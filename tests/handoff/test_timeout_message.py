"""What a handoff given up at its timeout says (handoff/source._not_converged): the figures that tell the
user what would help, from libvirt's job stats."""

from __future__ import annotations

from nephele.handoff.source import _not_converged


def test_the_message_gives_what_was_left_the_dirty_rate_the_link_and_the_throttle() -> None:
    js = {
        "memory_remaining": 3 << 20,
        "disk_remaining": 1 << 20,
        "memory_dirty_rate": 256,
        "memory_page_size": 4096,
    }
    msg = _not_converged(45.0, js, 0.5 * 2**20, 60, True)
    assert msg == (
        "not converged within the handoff timeout of 45 s: 4.0 MiB still to send, the guest dirties "
        "1.0 MiB/s, the link carries 0.50 MiB/s, the guest slowed by 60 %; raise the timeout or the "
        "bandwidth, or lower the guest's write rate"
    )


def test_without_auto_converge_it_says_so() -> None:
    msg = _not_converged(30.0, {}, 0.0, 0, False)
    assert "0.0 MiB still to send" in msg and "the guest not slowed (auto-converge off)" in msg
