"""A verify: all of P against all of S by digests, one slice at a time between the loop's other work.

    compare:  a slice of pieces each turn of the primary's loop (at most `rate` bytes a second),
              live, in two levels (resync.compare): only digests travel; checkpoints, heartbeats
              and requests go on between slices
    recheck:  the pieces that differed, once more, live: a piece read while a write to it was in
              flight differs once, then no more
    confirm:  the pieces that still differ, with the primary's top device suspended with flush
              (Primary.frozen): every acknowledged write is on P and S and none is in flight, as at
              a checkpoint.  Only a difference seen there is reported: a write in flight never is.
              At most CONFIRM_PIECES a pause (each pause one digest round trip).

A run on demand (`dmrepl verify`) and the schedule's (`verify_interval_s`) are the
same job; requests that come while one runs wait for its report.
"""

from __future__ import annotations

import time
from concurrent.futures import Future

from dmrepl.daemon import peer
from dmrepl.daemon.progress import log, progress_fields, rate_and_eta
from dmrepl.link.session import Session
from dmrepl.roles.primary import Devices, Primary, resync
from dmrepl.roles.primary.resync import FANOUT

SLICE_BYTES = 8 << 20     # compared in one turn of the loop at most: one digest request's worth
SLICE_SECONDS = 0.25      # with a rate limit, a slice is what the rate allows in this time
CONFIRM_PIECES = 256      # pieces compared in one pause of the consumer's writes


class Verify:
    def __init__(self, pri: Primary, devs: Devices, session: Session, silence_s: float, *,
                 rate_bytes_s: int | None = None, repair: bool = False, why: str = "on demand"):
        self.pri, self.devs, self.session, self.silence_s = pri, devs, session, silence_s
        self.rate, self.repair, self.why = rate_bytes_s, repair, why
        self.size = pri.size_bytes()
        self.region = resync.region_sectors(self.size)
        self.piece = self.region * 512
        self.total = resync.regions(self.size, self.region)
        self.phase = "comparing"
        self.cursor = 0                  # pieces compared by the first pass
        self.suspects: list[int] = []    # pieces that differed and wait for the next phase
        self.first_pass = 0              # pieces the first pass found differing
        self.frozen_pieces = 0           # pieces compared with the writes suspended
        self.differing: list[int] = []   # confirmed
        self.digest_bytes = 0
        self.pauses: list[float] = []
        self.started = time.time()
        self.t0 = time.monotonic()
        self.due = self.t0               # time.monotonic() of the next step
        self.waiters: list[Future] = []
        self._shown = -1

    def _remote(self, spans, piece):
        return peer.remote_digests(self.session, spans, piece, self.silence_s)

    def _compare(self, ranges: list[tuple[int, int]], fanout: int = FANOUT) -> list[int]:
        cmp = resync.compare(self.devs.disk, ranges, self.region, self._remote, fanout=fanout)
        self.digest_bytes += cmp.digest_bytes
        return cmp.differing

    def slice_pieces(self) -> int:
        """Pieces in one slice: whole first-level groups (their digests are then as without slices)."""
        n = SLICE_BYTES // self.piece
        if self.rate:
            n = min(n, int(self.rate * SLICE_SECONDS) // self.piece)
        return max(FANOUT, n - n % FANOUT)

    def step(self) -> bool:
        """One slice, the recheck, or one confirmation pause; True once the report is ready."""
        start = time.monotonic()
        if self.phase == "comparing":
            n = min(self.slice_pieces(), self.total - self.cursor)
            self.suspects += self._compare([(self.cursor, self.cursor + n)])
            self.cursor += n
            pct = 100 * self.cursor // self.total
            if pct // 25 != self._shown // 25:
                log(f"verify: {pct}% ({self.cursor} of {self.total} pieces of {self.piece // 1024} KiB)")
                self._shown = pct
            if self.rate:
                self.due = start + n * self.piece / self.rate
            if self.cursor >= self.total:
                self.first_pass = len(self.suspects)
                self.phase = "rechecking"
            return False
        if self.phase == "rechecking":
            if self.suspects:
                self.suspects = self._compare([(p, p + 1) for p in self.suspects], fanout=1)
            self.phase = "confirming"
        batch, self.suspects = self.suspects[:CONFIRM_PIECES], self.suspects[CONFIRM_PIECES:]
        if batch:
            found: list[int] = []
            self.pauses.append(self.pri.frozen(
                lambda: found.extend(self._compare([(p, p + 1) for p in batch], fanout=1))))
            self.frozen_pieces += len(batch)
            self.differing += found
        if self.suspects:
            return False
        self.phase = "done"
        return True

    def progress(self) -> dict:
        """`status`'s `verify` while it runs: the first pass's bytes, rate and ETA."""
        done = min(self.cursor * self.piece, self.size)
        return {"work": "verify", "phase": self.phase, "why": self.why, "rate_limit_bytes_s": self.rate,
                **progress_fields(done, self.size, *rate_and_eta(done, self.size, self.t0))}

    def report(self) -> dict:
        piece = self.piece
        ranges: list[list[int]] = []
        for d in sorted(self.differing):
            if ranges and ranges[-1][0] + ranges[-1][1] == d * piece:
                ranges[-1][1] += piece
            else:
                ranges.append([d * piece, piece])
        report = {"compared_bytes": self.size, "piece_bytes": piece, "differing_bytes": len(self.differing) * piece,
                  "differing": ranges, "digest_bytes": self.digest_bytes,
                  "seconds": round(time.monotonic() - self.t0, 3), "started": self.started, "finished": time.time(),
                  "why": self.why, "rate_limit_bytes_s": self.rate, "first_pass_differing_pieces": self.first_pass,
                  "frozen_pieces": self.frozen_pieces, "frozen_pauses": len(self.pauses),
                  "frozen_pause_max_ms": round(max(self.pauses, default=0.0) * 1000, 3)}
        log(f"verify ({self.why}): {len(self.differing)} piece(s) differ in {len(ranges)} range(s) "
            f"({report['seconds']:.1f} s, {self.digest_bytes >> 10} KiB of digests; {self.first_pass} piece(s) "
            f"differed on the first pass, {self.frozen_pieces} compared with writes suspended)")
        return report
