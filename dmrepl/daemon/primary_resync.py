"""The copies the primary's daemon drives: the initial full copy, and a delta resync from its loop.

    begin():  (the NBD leg is back: every write reaches both legs)
              era blocks written since the common checkpoint -> pieces -> digests of P and of S
              compared -> the differing pieces handed to the kernel's mirror recovery, all at once
              without a rate limit, else a batch of what the rate allows in PLAN_S
    poll():   until the mirror has copied the batch; then the log is checked (a copy that failed
              leaves its bit: never trust "in sync" alone) and the mirror goes back to core nosync;
              the next batch starts when the rate allows (roles/primary/rate.py)
    status(): what `dmrepl status` shows: phase, pieces compared and differing, bytes sent

The daemon then takes a checkpoint, which makes S's view P's again.  Until
then S's view stays at the last checkpoint (its hidden store keeps a copy of
every piece the resync overwrites): the standby is consistent throughout.
"""

from __future__ import annotations

import time
from typing import Callable

from dmrepl.daemon import peer
from dmrepl.daemon.progress import Progress, log
from dmrepl.errors import DmreplError
from dmrepl.link.session import Session
from dmrepl.roles.primary import Devices, Primary, ResyncBase, resync, sync
from dmrepl.roles.primary.rate import PLAN_S, Controller
from dmrepl.roles.primary.resync import Comparison


class ResyncFailed(DmreplError):
    pass


class ResyncStopped(Exception):
    """The daemon is stopping: the comparison ends where it is (the next start compares again)."""


def initial_sync(disk: str, nbd_path: str, session: Session, store_bytes: int, progress: Progress) -> None:
    """The first start's full copy of P to S, verified by digests.  Half the secondary's store per
    segment, with a checkpoint (number 0 again: S is not yet a copy of P, no view is worth keeping)
    between segments to empty it."""
    log("initial sync: copying P to S, then comparing digests")
    res = sync.initial_sync(disk, nbd_path, progress=progress,
                            segment_bytes=store_bytes // 2 or None, between=lambda: peer.remote_checkpoint(session, 0))
    log(f"initial sync: {res.copied_bytes >> 20} MiB copied in {res.copy_seconds:.1f} s "
        f"({res.copy_mb_s:.1f} MB/s), verified in {res.verify_seconds:.1f} s")


class Resync:
    def __init__(self, pri: Primary, devs: Devices, nbd_path: str, session: Session, base: ResyncBase,
                 silence_s: float, stopping: Callable[[], bool] = lambda: False, rate: Controller | None = None):
        """`silence_s`: the longest the secondary may send nothing while it hashes (its heartbeat
        answers go on meanwhile): the heartbeat timeout, as outside a comparison.  `rate`: the
        copy's limits (None: the kernel copies everything at once)."""
        self.pri, self.devs, self.nbd_path, self.session, self.base = pri, devs, nbd_path, session, base
        self.silence_s = silence_s
        self.stopping = stopping
        self.rate = rate
        self.batch: list[int] = []               # the regions the kernel copies now
        self.next_batch_at = 0.0                 # time.monotonic(): the rate's gate for the next one
        self.batches = 0
        self.in_batch = 0                        # regions of the batch the kernel says are copied
        self.phase = "comparing"
        self.started = time.time()
        self.region = 0
        self.regions = 0
        self.cmp = Comparison()
        self.compared = 0
        self.copied_regions = 0
        self.copy_region = 0
        self.to_copy: list[int] = []
        self.copy_started: float | None = None   # the comparison's end
        self.finished: float | None = None
        self._shown = -1

    @property
    def piece(self) -> int:
        return self.region * 512

    def _progress(self, what: str, done: int, total: int) -> None:
        pct = 100 * done // max(total, 1)
        if pct // 25 != self._shown // 25 or done >= total:
            unit = f"regions of {self.copy_region // 2}" if what == "copied" else f"pieces of {self.piece // 1024}"
            log(f"resync: {what} {pct}% ({done} of {total} {unit} KiB)")
        self._shown = -1 if done >= total else pct

    def begin(self, known: tuple[int, list[int]] | None = None) -> None:
        """Compare and start the copy (blocking: digests travel for every candidate piece; status is
        answered on its own thread meanwhile, and a stop ends the comparison: ResyncStopped);
        `known` = (region, pieces) already found to differ (verify --repair) skips the comparison."""
        if known is not None:
            self.region, pieces = known
            self.cmp = Comparison(candidate_pieces=len(pieces), differing=list(pieces))
        else:
            self.region, ranges = self.pri.resync_candidates(self.devs, self.base)
            log(f"resync: {self.base.describe()}: {sum(b - a for a, b in ranges)} piece(s) of "
                f"{self.piece // 1024} KiB to compare")

            def progress(done, total):
                self.compared = done
                self._progress("compared", done, total)
                if self.stopping():
                    raise ResyncStopped()

            self.cmp = resync.compare(self.devs.disk, ranges, self.region,
                                      lambda spans, piece: peer.remote_digests(self.session, spans, piece,
                                                                                self.silence_s),
                                      progress)
        self.copy_started = time.time()
        if not self.cmp.differing:
            self.phase = "copied"
            self.finished = self.copy_started
            return
        budget = resync.copy_budget(self.differing_bytes, self.cmp.digest_bytes)
        self.copy_region, self.to_copy = resync.coarsen(self.cmp.differing, self.region, self.pri.size_bytes(),
                                                        budget)
        self.phase = "copying"
        limit = self.rate.rate() if self.rate else None
        log(f"resync: {len(self.cmp.differing)} piece(s) differ ({self.differing_bytes >> 10} KiB): the kernel "
            f"copies them as {len(self.to_copy)} region(s) of {self.copy_region // 2} KiB under its region locks"
            + (f", at most {limit / (1 << 20):.1f} MiB/s now" if limit else ""))
        self._start_batch()

    def _start_batch(self) -> None:
        """Hand the kernel the next regions: all that are left without a limit, else what the rate
        allows in PLAN_S (at least one region)."""
        left = self.to_copy[self.copied_regions:]
        limit = self.rate.rate() if self.rate else None
        region_bytes = self.copy_region * 512
        n = len(left) if limit is None else max(1, int(limit * PLAN_S) // region_bytes)
        self.batch = left[:n]
        now = time.monotonic()
        self.next_batch_at = now + (len(self.batch) * region_bytes / limit if limit else 0.0)
        self.event_nr, self.regions = self.pri.start_recovery(self.devs, self.nbd_path, self.copy_region,
                                                              self.batch)
        self.batches += 1

    def poll(self, kernel: dict) -> bool:
        """True once every differing piece is on S and the mirror replicates plainly again
        (`kernel`: the primary's kernel_status, read this turn of the loop)."""
        if self.phase == "copied":
            return True
        if not self.batch:                       # between batches: the mirror replicates plainly
            if time.monotonic() < self.next_batch_at:
                return False
            self._start_batch()
            return False
        rec = kernel.get("recovery")
        if rec is None:
            return False
        missing = rec["regions"] - rec["regions_in_sync"]
        self.in_batch = len(self.batch) - missing
        self._progress("copied", self.copied_regions + self.in_batch, len(self.to_copy))
        if missing:
            return False
        left = self.pri.finish_recovery(self.devs, self.nbd_path, self.regions)
        if left:
            raise ResyncFailed(f"{len(left)} piece(s) were not copied although the mirror said in sync "
                               "(a write to S failed during the copy)", "the next reconnection copies them")
        self.copied_regions += len(self.batch)
        self.batch, self.in_batch = [], 0
        if self.copied_regions < len(self.to_copy):
            return False
        self.phase = "copied"
        self.finished = time.time()
        return True

    @property
    def differing_bytes(self) -> int:
        return len(self.cmp.differing) * self.piece

    @property
    def copy_bytes(self) -> int:
        return len(self.to_copy) * self.copy_region * 512

    def seconds(self) -> tuple[float, float]:
        """Time spent comparing and copying so far."""
        now = time.time()
        compared = (self.copy_started or now) - self.started
        return compared, ((self.finished or now) - self.copy_started) if self.copy_started else 0.0

    def status(self) -> dict:
        compare_s, copy_s = self.seconds()
        copied = self.copy_bytes if self.phase == "copied" else \
            (self.copied_regions + self.in_batch) * self.copy_region * 512
        rate = copied / copy_s if copy_s > 0 else 0.0
        eta = (self.copy_bytes - copied) / rate if rate > 0 and self.phase == "copying" else None
        limits = self.rate.status() if self.rate else {"rate_limit_bytes_s": None}
        return {"phase": self.phase, "since": self.base.describe(), "started": self.started,
                "piece_bytes": self.piece, "candidate_bytes": self.cmp.candidate_pieces * self.piece,
                "compared_bytes": self.compared * self.piece, "differing_bytes": self.differing_bytes,
                "copy_region_bytes": self.copy_region * 512, "copy_bytes": self.copy_bytes,
                "copied_bytes": copied, "rate_bytes_s": round(rate), "eta_s": None if eta is None else round(eta, 1),
                "batches": self.batches, **limits,
                "digest_bytes": self.cmp.digest_bytes, "sent_bytes": self.copy_bytes + self.cmp.digest_bytes,
                "compare_seconds": round(compare_s, 3), "copy_seconds": round(copy_s, 3)}

    def summary(self) -> str:
        s = self.status()
        took = (self.finished or time.time()) - self.started
        return (f"resync done in {took:.1f} s (compare {s['compare_seconds']:.1f} s, copy "
                f"{s['copy_seconds']:.1f} s): {s['candidate_bytes'] >> 10} KiB compared, "
                f"{s['differing_bytes'] >> 10} KiB differed, {s['copy_bytes'] >> 10} KiB copied, "
                f"{s['digest_bytes'] >> 10} KiB of digests")
