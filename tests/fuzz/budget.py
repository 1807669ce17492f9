"""One setting, two budgets: NEPHELE_FUZZ=ci (default; `make test`) or long (`make fuzz`).

ci is derandomized and keeps no example database, so a CI run is reproducible and its cost is fixed;
long draws fresh random inputs each run (and remembers failures in .hypothesis/ to replay them first).
The settings are applied per test (a decorator), never as a global profile, so the other property
tests of the suite keep their own settings.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator
from typing import Any

from hypothesis import HealthCheck, settings

MODES = {"ci": 1, "long": 30}
ENV = "NEPHELE_FUZZ"


def mode() -> str:
    value = os.environ.get(ENV, "ci") or "ci"
    if value not in MODES:
        raise RuntimeError(f"{ENV}={value!r}: expected one of {', '.join(MODES)}")
    return value


def fuzz(ci_examples: int) -> settings:
    """Settings for a fuzz test that runs `ci_examples` inputs in CI, 30x as many with NEPHELE_FUZZ=long."""
    long = mode() == "long"
    return settings(
        max_examples=ci_examples * MODES[mode()],
        deadline=None,  # a hang is caught by bounded inputs, not by wall-clock noise on a shared machine
        derandomize=not long,
        database=settings.default.database if long else None,
        print_blob=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    )


class Hang(AssertionError):
    pass


@contextlib.contextmanager
def no_hang(seconds: float = 20.0) -> Iterator[None]:
    """Fail (instead of waiting forever) when the target runs longer than `seconds` on one input. Inputs
    are bounded to a few hundred KiB, so a healthy target answers in well under a second."""

    def expire(_signum: int, _frame: Any) -> None:
        raise Hang(f"the target did not return within {seconds} s (a hang on this input)")

    old = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
