"""Bounded waits for what the kernel and other processes do asynchronously.

Deferred dm removal (dm.c: dm_blk_close queues the removal on a workqueue),
loop detach after the last close, udev's links, a process's exit: none of these
is done when the call that caused it returns.  Code and tests wait for the
outcome with a deadline instead of sleeping or asserting at once; under a
loaded CPU the same wait takes longer but never fails at random.
"""

from __future__ import annotations

import time
from typing import Callable, TypeVar

T = TypeVar("T")

# Long enough for a TCG guest next to a CPU-bound process (scripts/test --stress).
DEFAULT_TIMEOUT = 30.0


class WaitTimeout(TimeoutError):
    """The awaited outcome did not happen by the deadline; says what and the last value seen."""


def until(predicate: Callable[[], bool], *, timeout: float, interval: float = 0.02) -> bool:
    """Poll `predicate` until it is true (True) or `timeout` seconds passed (False)."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


def wait_for(probe: Callable[[], T], what: str, *, ok: Callable[[T], bool] = bool,
             timeout: float = DEFAULT_TIMEOUT, interval: float = 0.02) -> T:
    """Poll `probe()` until `ok(value)`; return that value, or raise WaitTimeout naming `what`.

    The error carries the last value seen, so a failure says what the system
    looked like at the deadline, not only that it took too long.
    """
    last: list = []

    def check() -> bool:
        last[:] = [probe()]
        return ok(last[0])

    t0 = time.monotonic()
    if until(check, timeout=timeout, interval=interval):
        return last[0]
    raise WaitTimeout(f"timed out after {time.monotonic() - t0:.1f} s waiting for {what}; last seen: {last[0]!r}")
