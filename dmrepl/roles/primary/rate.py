"""How fast a copy to S may go: a floor, a ceiling and a share of the link, adapted to the consumer.

The ceiling is what the link may carry for dmrepl (bytes a second, the admin's figure). The
consumer's own writes cross the same link, so a copy (the initial sync, a resync) gets what they
leave, never less than the floor (a copy that never ends leaves S behind for good; DRBD's
c-min-rate) and, while the consumer writes, never more than `share` of the ceiling:

    consumer idle:     rate = ceiling
    consumer writes c: rate = clamp(min(ceiling - c, share * ceiling), floor, ceiling)

c is measured, not configured: the consumer device's written bytes (its block statistics) over
the last PLAN_S, like DRBD's controller, which plans a fixed time ahead.  No ceiling: no limit
(the kernel copies as fast as it goes), whatever the floor and share say.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Callable

PLAN_S = 1.0              # the consumer's rate is measured over this long; a copy plans this far ahead
STALE_S = 4 * PLAN_S      # a sample older than this starts a new window (the daemon samples each turn)


@dataclass(frozen=True)
class Limits:
    floor_bytes_s: int = 0                  # the copy gets at least this
    ceiling_bytes_s: int | None = None      # what the link may carry for dmrepl; None: no limit
    share: float = 1.0                      # the most of the ceiling the copy takes while the consumer writes

    def check(self) -> "Limits":
        """These limits, or ValueError saying what is wrong."""
        if not 0 < self.share <= 1:
            raise ValueError(f"the share of the link must be more than 0 and at most 1, got {self.share:g}")
        if self.ceiling_bytes_s is not None and self.floor_bytes_s > self.ceiling_bytes_s:
            raise ValueError(f"the floor ({self.floor_bytes_s} bytes/s) is above the ceiling ({self.ceiling_bytes_s} bytes/s)")
        return self

    def changed(self, **fields) -> "Limits":
        """A copy with the fields given (None values left as they are, except `ceiling_bytes_s=0`: no limit)."""
        given = {k: v for k, v in fields.items() if v is not None}
        if given.get("ceiling_bytes_s") == 0:
            given["ceiling_bytes_s"] = None
        return replace(self, **given).check()

    def fields(self) -> dict:
        return {"floor_bytes_s": self.floor_bytes_s, "ceiling_bytes_s": self.ceiling_bytes_s, "share": self.share}

    def rate(self, consumer_bytes_s: float) -> int | None:
        """Bytes a second the copy may take now; None: no limit."""
        if self.ceiling_bytes_s is None:
            return None
        if consumer_bytes_s <= 0:
            return self.ceiling_bytes_s
        left = min(self.ceiling_bytes_s - consumer_bytes_s, self.share * self.ceiling_bytes_s)
        return int(min(max(left, self.floor_bytes_s), self.ceiling_bytes_s))


class Controller:
    """The limits (changed while a copy runs: `dmrepl tune`) and the consumer's measured write rate."""

    def __init__(self, limits: Limits, consumer_written: Callable[[], int | None],
                 clock: Callable[[], float] = time.monotonic):
        self.limits = limits
        self._written, self._clock = consumer_written, clock
        self._last: tuple[float, int] | None = None
        self.consumer_bytes_s = 0.0

    def sample(self) -> None:
        """Measure the consumer's write rate: at most one new figure per PLAN_S."""
        now, written = self._clock(), self._written()
        if written is None:
            return
        if self._last is None:
            self._last = (now, written)
            return
        t, w = self._last
        if now - t > STALE_S:           # not sampled for long: an average over it says little of now
            self._last = (now, written)
        elif now - t >= PLAN_S:
            self.consumer_bytes_s = max(0.0, (written - w) / (now - t))
            self._last = (now, written)

    def rate(self) -> int | None:
        self.sample()
        return self.limits.rate(self.consumer_bytes_s)

    def status(self) -> dict:
        return {"rate_limit_bytes_s": self.limits.rate(self.consumer_bytes_s), **self.limits.fields(),
                "consumer_write_bytes_s": round(self.consumer_bytes_s)}


class Pacer:
    """Holds a copy back to its controller's rate: called with the bytes its current phase has
    done, it sleeps while they are ahead of the rate (a new phase, fewer bytes: it starts over)."""

    def __init__(self, controller: Controller, stopping: Callable[[], bool] = lambda: False,
                 sleep: Callable[[float], None] = time.sleep, clock: Callable[[], float] = time.monotonic):
        self.controller, self.stopping, self._sleep, self._clock = controller, stopping, sleep, clock
        self._anchor: tuple[float, int, int | None] | None = None     # (time, bytes done, rate)

    def __call__(self, done: int) -> None:
        rate = self.controller.rate()
        now = self._clock()
        if self._anchor is None or done < self._anchor[1] or rate != self._anchor[2] or rate is None:
            self._anchor = (now, done, rate)       # a new phase or a new rate: paced from here
            return
        t0, done0, _ = self._anchor
        due = t0 + (done - done0) / rate
        while now < due and not self.stopping():
            self._sleep(min(0.2, due - now))
            now = self._clock()
