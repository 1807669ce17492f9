"""The source's downtime limiter: QEMU's limit follows the recent wire/stream ratio, and leaves a share
of the budget for what follows the last pages (device state, switchover check, libvirt's finish)."""

from __future__ import annotations

import threading
import time
from typing import Any

from nephele.handoff.source import FIRST_PASS_DOWNTIME_MS, RESERVE, _DowntimeLimiter


class FakeMigration:
    def __init__(self) -> None:
        self.done = threading.Event()
        self.limits: list[int] = []

    def set_downtime(self, ms: int) -> None:
        self.limits.append(ms)


def limiter(budget: int) -> tuple[_DowntimeLimiter, FakeMigration]:
    mig = FakeMigration()
    lim = _DowntimeLimiter(mig, budget, proxies=None)  # type: ignore[arg-type]
    return lim, mig


def feed(lim: _DowntimeLimiter, ratio: float, steps: int = 4) -> None:
    stream = wire = 0
    for _ in range(steps):
        stream += 4 << 20
        wire += int((4 << 20) * ratio)
        lim.update(stream, wire)


def test_incompressible_data_gets_the_budget_less_the_reserve() -> None:
    lim, mig = limiter(2000)
    feed(lim, 1.0)
    assert mig.limits[-1] == int(2000 * (1 - RESERVE))


def test_a_cheap_stream_gets_a_proportionally_smaller_limit() -> None:
    lim, mig = limiter(2000)
    feed(lim, 0.1)
    assert abs(mig.limits[-1] - 2000 * (1 - RESERVE) * 0.1) <= 1


def test_never_below_the_first_pass_limit() -> None:
    lim, mig = limiter(2000)
    feed(lim, 0.0001)
    assert mig.limits == [] or mig.limits[-1] >= FIRST_PASS_DOWNTIME_MS


def test_small_samples_change_nothing() -> None:
    lim, mig = limiter(2000)
    any_: Any = lim
    any_.update(1000, 1000)
    any_.update(2000, 2000)
    assert mig.limits == []


def test_what_the_pipeline_holds_comes_off_the_budget() -> None:
    plain, m1 = limiter(2000)
    held, m2 = limiter(2000)
    stream = wire = 0
    for _ in range(4):
        time.sleep(0.05)
        stream += 4 << 20
        wire += 2 << 20
        plain.update(stream, wire)
        held.update(stream, wire, backlog=2 << 20)
    assert 0 < m2.limits[-1] < m1.limits[-1]


def test_a_backlog_longer_than_the_budget_leaves_the_first_pass_limit() -> None:
    lim, mig = limiter(2000)
    stream = 0
    for _ in range(4):
        time.sleep(0.05)
        stream += 4 << 20
        lim.update(stream, stream, backlog=1 << 30)
    assert lim.current == FIRST_PASS_DOWNTIME_MS and set(mig.limits) <= {FIRST_PASS_DOWNTIME_MS}


def test_bytes_sent_but_not_yet_read_at_the_destination_come_off_the_budget() -> None:
    plain, m1 = limiter(2000)
    bloated, m2 = limiter(2000)
    stream = wire = 0
    for _ in range(4):
        time.sleep(0.05)
        stream += 4 << 20
        wire += 2 << 20
        plain.update(stream, wire, acked=wire)
        bloated.update(stream, wire, acked=wire - (1 << 20))  # 1 MiB still in the network's buffers
    assert 0 < m2.limits[-1] < m1.limits[-1]
