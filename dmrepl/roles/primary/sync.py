"""The initial sync: a full copy of P to S over the NBD device, then a verification pass.

The copy is the Cython bulk copy (GIL-free, O_DIRECT, progress callback); the
verification reads both sides in pieces and compares SHA-256 digests, so that a
copy that "succeeded" but left S different is caught before replication starts.
`--assume-clean` skips both for disks the admin knows to be equal.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from typing import Callable

from dmrepl.errors import DmreplError
from dmrepl.kernel import blockdev

PIECE_BYTES = 1 << 20


@dataclass(frozen=True)
class SyncResult:
    copied_bytes: int
    copy_seconds: float
    verified_bytes: int
    verify_seconds: float

    @property
    def copy_mb_s(self) -> float:
        return self.copied_bytes / self.copy_seconds / 1e6 if self.copy_seconds else 0.0


def copy(p: str, s: str, progress: Callable[[int, int], None] | None = None, *,
         segment_bytes: int | None = None, between: Callable[[], None] | None = None) -> tuple[int, float]:
    """Copy all of P to S; `progress(done, total)` in bytes. Returns (bytes, seconds).

    With `segment_bytes`, the copy goes in segments of that size, S flushed and
    `between()` called after each: the secondary's hidden store takes a copy of
    every chunk the sync overwrites, and a checkpoint between segments empties
    it, so that the store need not hold the whole disk.
    """
    total = blockdev.size_bytes(p)
    if blockdev.size_bytes(s) != total:
        raise DmreplError(f"initial sync: {p} is {total} bytes, {s} is {blockdev.size_bytes(s)}: "
                          "the two disks must be of one size", "grow the smaller one, or fix the config")
    step = total if not segment_bytes else max(PIECE_BYTES, segment_bytes // PIECE_BYTES * PIECE_BYTES)
    t0 = time.perf_counter()
    done = 0
    for off in range(0, total, step):
        n = min(step, total - off)
        base = done
        done += blockdev.copy_extents(p, s, [(off, n)], io_bytes=PIECE_BYTES,
                                      progress=(lambda d: progress(base + d, total)) if progress else None)
        if between is not None and off + n < total:
            blockdev.flush(s)
            between()
    return done, time.perf_counter() - t0


def differing(p: str, s: str, progress: Callable[[int, int], None] | None = None) -> list[tuple[int, int]]:
    """(offset, length) of the pieces whose digests differ between P and S, merged."""
    total = blockdev.size_bytes(p)
    out: list[tuple[int, int]] = []
    for off in range(0, total, PIECE_BYTES):
        n = min(PIECE_BYTES, total - off)
        if hashlib.sha256(blockdev.read_at(p, off, n)).digest() != hashlib.sha256(blockdev.read_at(s, off, n)).digest():
            if out and out[-1][0] + out[-1][1] == off:
                out[-1] = (out[-1][0], out[-1][1] + n)
            else:
                out.append((off, n))
        if progress:
            progress(off + n, total)
    return out


def initial_sync(p: str, s: str, *, assume_clean: bool = False,
                 progress: Callable[[str, int, int], None] | None = None,
                 segment_bytes: int | None = None, between: Callable[[], None] | None = None) -> SyncResult:
    """Copy and verify, or neither with assume_clean; raises if S differs after the copy."""
    if assume_clean:
        return SyncResult(0, 0.0, 0, 0.0)
    copied, copy_s = copy(p, s, (lambda d, t: progress("copy", d, t)) if progress else None,
                          segment_bytes=segment_bytes, between=between)
    t0 = time.perf_counter()
    bad = differing(p, s, (lambda d, t: progress("verify", d, t)) if progress else None)
    if bad:
        first = ", ".join(f"[{o}, {o + n})" for o, n in bad[:3])
        raise DmreplError(f"initial sync: S differs from P after the copy in {len(bad)} range(s): {first}",
                          "check the secondary's disk and the link; nothing was started")
    return SyncResult(copied, copy_s, blockdev.size_bytes(p), time.perf_counter() - t0)
