"""The primary daemon's log lines and progress (initial sync, resync) on stderr: the journal under systemd."""

from __future__ import annotations

import sys
import time

from dmrepl.errors import DmreplError

EXTEND_S = 120.0      # the start may take this much longer after each percent of an initial sync


def log(msg: str) -> None:
    print(time.strftime("%Y-%m-%d %H:%M:%S ") + msg, file=sys.stderr, flush=True)


def eta_text(seconds: float | None) -> str:
    if seconds is None:
        return "--:--"
    m, sec = divmod(int(seconds + 0.5), 60)
    return f"{m // 60}:{m % 60:02d}:{sec:02d}" if m >= 60 else f"{m:02d}:{sec:02d}"


def rate_and_eta(done: int, total: int, t0: float) -> tuple[float, float | None]:
    """Bytes a second since `t0` (time.monotonic) and the seconds left at that rate."""
    rate = done / max(time.monotonic() - t0, 1e-6)
    return rate, ((total - done) / rate if rate > 0 else None)


def progress_fields(done: int, total: int, rate: float, eta: float | None) -> dict:
    """A long job's progress as `status --json` shows it (the initial sync's `sync`, `verify`)."""
    return {"done_bytes": done, "total_bytes": total, "rate_bytes_s": round(rate),
            "eta_s": None if eta is None else round(eta, 1)}


def bar_text(work: str, done: int, total: int, rate: float, eta: float | None) -> str:
    """One terminal line: `work [#####    ]  40%   12.3 MB/s  ETA 00:12`."""
    pct = 100 * done // max(total, 1)
    return f"{work:6} [{'#' * (pct // 4):<25}] {pct:3d}%  {rate / 1e6:7.1f} MB/s  ETA {eta_text(eta)}"


class Bar:
    """One terminal line on stderr, redrawn in place (cleared to its end: a shorter line leaves
    nothing); end() closes it with a newline, once."""

    def __init__(self):
        self.shown = False

    def draw(self, line: str) -> None:
        print("\r" + line + "\033[K", end="", file=sys.stderr, flush=True)
        self.shown = True

    def end(self) -> None:
        if self.shown:
            print(file=sys.stderr, flush=True)
            self.shown = False


def running_work(status: dict) -> tuple[str, int, int] | None:
    """The long job a primary's `status` shows running, as (label, done bytes, total bytes): the
    initial sync's copy or verify, a resync's comparison or copy, a verify; None when none runs."""
    if status.get("sync"):
        s = status["sync"]
        return s["phase"], s["done_bytes"], s["total_bytes"]
    r = status.get("resync")
    if r and r["phase"] == "comparing":
        return "compare", r["compared_bytes"], r["candidate_bytes"]
    if r:
        return "copy", r["copied_bytes"], r["copy_bytes"]
    if status.get("verify"):
        v = status["verify"]
        return "verify", v["done_bytes"], v["total_bytes"]
    return None


class Rate:
    """Rate and ETA of a job watched from outside (`dmrepl wait`), from the first sample of its
    current label on: a new label (the next phase) starts over."""

    def __init__(self):
        self.label: str | None = None
        self.t0 = 0.0
        self.done0 = 0

    def __call__(self, label: str, done: int, total: int, now: float) -> tuple[float, float | None]:
        if label != self.label or done < self.done0:
            self.label, self.t0, self.done0 = label, now, done
        rate = (done - self.done0) / max(now - self.t0, 1e-6)
        return rate, ((total - done) / rate if rate > 0 else None)


class Progress:
    """The initial sync's progress: a live bar with rate and ETA on a terminal, a line every 10 %
    in a log; `latest` for `status --json`, `on_step` (every 10 %) for the event log."""

    def __init__(self, stopping=lambda: False, notifier=None, on_step=None, pacer=None):
        """`notifier`: systemd's (daemon/notify.py): each step extends the unit's start timeout,
        so that a long initial sync that makes progress is not killed, and one that hangs is."""
        self.stopping = stopping
        self.pacer = pacer          # holds the copy back to its rate limit (roles/primary/rate.py)
        self.notifier = notifier
        self.on_step = on_step
        self.tty = sys.stderr.isatty()
        self.bar = Bar()
        self.t0 = time.monotonic()
        self.shown = -1
        self.latest: dict | None = None

    def __call__(self, phase: str, done: int, total: int) -> None:
        if self.stopping():
            raise DmreplError(f"initial sync stopped at {done >> 20} of {total >> 20} MiB ({phase})",
                              "S is incomplete: the next start copies it again")
        if self.pacer is not None:
            self.pacer(done)
        pct = 100 * done // max(total, 1)
        rate, eta = rate_and_eta(done, total, self.t0)
        self.latest = {"work": "initial sync", "phase": phase, **progress_fields(done, total, rate, eta)}
        line = (f"{phase} {pct}% ({done >> 20} of {total >> 20} MiB, {rate / 1e6:.1f} MB/s, "
                f"ETA {eta_text(eta)})")
        if self.notifier is not None and pct != self.shown:
            self.notifier.extend_start(EXTEND_S, f"primary, initial sync: {line}")
        if self.tty:
            self.bar.draw(bar_text(phase, done, total, rate, eta))
            if done >= total:
                self.bar.end()
        if pct // 10 != self.shown // 10 or done >= total:
            if not self.tty:
                log(f"initial sync: {line}")
            if self.on_step is not None:
                self.on_step(self.latest)
        self.shown = pct
        if done >= total:                  # the next phase (verify) starts from naught
            self.t0, self.shown = time.monotonic(), -1
