"""The copies the primary's daemon drives: the initial full copy, and a delta resync from its loop.

    begin():  (the NBD leg is back: every write reaches both legs)
              era blocks written since the common checkpoint -> pieces -> digests of P and of S
              compared -> the differing pieces handed to the kernel's mirror recovery
    poll():   until the mirror has copied them; then the log is checked (a copy that failed leaves
              its bit: never trust "in sync" alone) and the mirror goes back to core nosync
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
from dmrepl.roles.primary.resync import Comparison


class ResyncFailed(DmreplError):
    pass


class ResyncStopped(Exception):
    """The daemon is stopping: the comparison ends where it is (the next start compares again)."""


VERIFY_PASSES = 3   # a piece must differ this many times in a row: a write in flight is not a difference


def verify(pri: Primary, devs: Devices, session: Session, silence_s: float,
           on_progress=lambda done_bytes, total_bytes: None) -> tuple[dict, list[int], int]:
    """All of P against all of S by digests while replication runs; returns (report, differing
    pieces, piece sectors).  Pieces that differ are compared again: a write between the two
    reads of a piece makes it differ once, a real difference every time.  `on_progress` hears
    the first pass's bytes compared."""
    size = pri.size_bytes()
    region = resync.region_sectors(size)
    piece = region * 512
    t0 = time.time()
    remote = lambda spans, p: peer.remote_digests(session, spans, p, silence_s)  # noqa: E731
    shown = [-1]

    def progress(done, total):
        on_progress(done * piece, total * piece)
        pct = 100 * done // max(total, 1)
        if pct // 25 != shown[0] // 25:
            log(f"verify: {pct}% ({done} of {total} pieces of {piece // 1024} KiB)")
            shown[0] = pct

    cmp = resync.compare(devs.disk, [(0, resync.regions(size, region))], region, remote, progress)
    differing, digest_bytes = cmp.differing, cmp.digest_bytes
    for _ in range(VERIFY_PASSES - 1):
        if not differing:
            break
        again = resync.compare(devs.disk, [(d, d + 1) for d in differing], region, remote)
        differing, digest_bytes = again.differing, digest_bytes + again.digest_bytes
    ranges: list[list[int]] = []
    for d in differing:
        if ranges and ranges[-1][0] + ranges[-1][1] == d * piece:
            ranges[-1][1] += piece
        else:
            ranges.append([d * piece, piece])
    report = {"compared_bytes": size, "piece_bytes": piece, "differing_bytes": len(differing) * piece,
              "differing": ranges, "digest_bytes": digest_bytes, "seconds": round(time.time() - t0, 3)}
    log(f"verify: {len(differing)} piece(s) differ in {len(ranges)} range(s) "
        f"({report['seconds']:.1f} s, {digest_bytes >> 10} KiB of digests)")
    return report, differing, region


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
                 silence_s: float, stopping: Callable[[], bool] = lambda: False):
        """`silence_s`: the longest the secondary may send nothing while it hashes (its heartbeat
        answers go on meanwhile): the heartbeat timeout, as outside a comparison."""
        self.pri, self.devs, self.nbd_path, self.session, self.base = pri, devs, nbd_path, session, base
        self.silence_s = silence_s
        self.stopping = stopping
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
            log(f"resync: {what} {pct}% ({done} of {total} pieces of {self.piece // 1024} KiB)")
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
        self.event_nr, self.regions = self.pri.start_recovery(self.devs, self.nbd_path, self.copy_region,
                                                              self.to_copy)
        self.phase = "copying"
        log(f"resync: {len(self.cmp.differing)} piece(s) differ ({self.differing_bytes >> 10} KiB): the kernel "
            f"copies them as {len(self.to_copy)} region(s) of {self.copy_region // 2} KiB under its region locks")

    def poll(self, kernel: dict) -> bool:
        """True once every differing piece is on S and the mirror replicates plainly again
        (`kernel`: the primary's kernel_status, read this turn of the loop)."""
        if self.phase == "copied":
            return True
        rec = kernel.get("recovery")
        if rec is None:
            return False
        missing = rec["regions"] - rec["regions_in_sync"]
        self.copied_regions = len(self.to_copy) - missing
        self._progress("copied", self.copied_regions, len(self.to_copy))
        if missing:
            return False
        left = self.pri.finish_recovery(self.devs, self.nbd_path, self.regions)
        if left:
            raise ResyncFailed(f"{len(left)} piece(s) were not copied although the mirror said in sync "
                               "(a write to S failed during the copy)", "the next reconnection copies them")
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
        return {"phase": self.phase, "since": self.base.describe(), "started": self.started,
                "piece_bytes": self.piece, "candidate_bytes": self.cmp.candidate_pieces * self.piece,
                "compared_bytes": self.compared * self.piece, "differing_bytes": self.differing_bytes,
                "copy_region_bytes": self.copy_region * 512, "copy_bytes": self.copy_bytes,
                "copied_bytes": self.copy_bytes if self.phase == "copied" else self.copied_regions * self.copy_region * 512,
                "digest_bytes": self.cmp.digest_bytes, "sent_bytes": self.copy_bytes + self.cmp.digest_bytes,
                "compare_seconds": round(compare_s, 3), "copy_seconds": round(copy_s, 3)}

    def summary(self) -> str:
        s = self.status()
        took = (self.finished or time.time()) - self.started
        return (f"resync done in {took:.1f} s (compare {s['compare_seconds']:.1f} s, copy "
                f"{s['copy_seconds']:.1f} s): {s['candidate_bytes'] >> 10} KiB compared, "
                f"{s['differing_bytes'] >> 10} KiB differed, {s['copy_bytes'] >> 10} KiB copied, "
                f"{s['digest_bytes'] >> 10} KiB of digests")
