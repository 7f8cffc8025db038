"""The primary daemon's log lines and progress (initial sync, resync) on stderr: the journal under systemd."""

from __future__ import annotations

import sys
import time

from dmrepl.errors import DmreplError

EXTEND_S = 120.0      # the start may take this much longer after each percent of an initial sync


def log(msg: str) -> None:
    print(time.strftime("%Y-%m-%d %H:%M:%S ") + msg, file=sys.stderr, flush=True)


class Progress:
    """The initial sync's progress on stderr: a live line on a terminal, every 10 % in a log."""

    def __init__(self, stopping=lambda: False, notifier=None):
        """`notifier`: systemd's (daemon/notify.py): each step extends the unit's start timeout,
        so that a long initial sync that makes progress is not killed, and one that hangs is."""
        self.stopping = stopping
        self.notifier = notifier
        self.tty = sys.stderr.isatty()
        self.t0 = time.monotonic()
        self.shown = -1

    def __call__(self, phase: str, done: int, total: int) -> None:
        if self.stopping():
            raise DmreplError(f"initial sync stopped at {done >> 20} of {total >> 20} MiB ({phase})",
                              "S is incomplete: the next start copies it again")
        pct = 100 * done // max(total, 1)
        rate = done / max(time.monotonic() - self.t0, 1e-6) / 1e6
        if self.notifier is not None and pct != self.shown:
            self.notifier.extend_start(EXTEND_S, f"primary, initial sync: {phase} {pct}% "
                                       f"({done >> 20} of {total >> 20} MiB, {rate:.1f} MB/s)")
        if self.tty:
            bar = "#" * (pct // 4)
            print(f"\r{phase:6} [{bar:<25}] {pct:3d}%  {rate:7.1f} MB/s", end="", file=sys.stderr, flush=True)
            if done >= total:
                print(file=sys.stderr)
                self.t0 = time.monotonic()
        elif pct // 10 != self.shown // 10 or done >= total:
            log(f"initial sync: {phase} {pct}% ({done >> 20} of {total >> 20} MiB, {rate:.1f} MB/s)")
            if done >= total:
                self.t0, pct = time.monotonic(), -1
        self.shown = pct
