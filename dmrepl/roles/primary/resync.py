"""Delta resync: which pieces of S differ from P, from the era's written set and piece digests.

    era blocks written since the common checkpoint's era  (era_invalidate, coarse: 1 MiB)
      -> pieces of the resync region size (4 KiB on disks up to 16 GiB)
      -> digests of P and of S compared piece by piece (only digests travel)
      -> the pieces that differ: the bitmap the kernel's mirror recovery copies

The comparison runs while the mirror already writes both legs (core nosync):
a piece equal at its comparison stays equal, since every later write reaches
both legs.  A write racing the comparison can only make a piece look
different (copied once more, harmless), never make a differing one look equal:
the copy itself is the kernel's, under its region lock.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

from dmrepl.ranges import merge
from dmrepl.roles import digests

SECTOR = 512
MIN_REGION_SECTORS = 8          # 4 KiB: the page, the smallest piece worth a digest
MAX_REGIONS = 1 << 22           # bitset 512 KiB, kernel bitsets 1.5 MiB: region grows beyond 16 GiB


def region_sectors(size_bytes: int) -> int:
    """The resync's region (and digest piece) size in sectors: 4 KiB, doubled until the disk has at
    most MAX_REGIONS of them."""
    r = MIN_REGION_SECTORS
    while size_bytes // SECTOR > r * MAX_REGIONS:
        r *= 2
    return r


def regions(size_bytes: int, region: int) -> int:
    """How many regions of `region` sectors the kernel counts (the last one may be short)."""
    return -(-size_bytes // (region * SECTOR))


def regions_of_blocks(blocks: Iterable[tuple[int, int]], era_block_sectors: int, region: int,
                      size_bytes: int) -> list[tuple[int, int]]:
    """Era block ranges [b, e) as merged region ranges [r0, r1) of `region` sectors, clipped to the disk."""
    total = regions(size_bytes, region)
    return merge((b * era_block_sectors // region, min(total, -(-e * era_block_sectors // region)))
                 for b, e in blocks)


@dataclass
class Comparison:
    """What the comparison found: counted for `status` and the closing log line."""

    candidate_pieces: int = 0
    differing: list[int] = field(default_factory=list)
    digest_bytes: int = 0        # bytes of digests that travelled (the secondary's replies)


FANOUT = 8   # pieces under one first-level digest


def _batches(ranges: list[tuple[int, int]], step: int) -> Iterator[list[tuple[int, int]]]:
    """The ranges as requests: each at most `step` pieces in at most MAX_SPANS (first, n) spans."""
    batch: list[tuple[int, int]] = []
    size = 0
    for r0, r1 in ranges:
        for first in range(r0, r1, step):
            n = min(step, r1 - first)
            if batch and (size + n > step or len(batch) == digests.MAX_SPANS):
                yield batch
                batch, size = [], 0
            batch.append((first, n))
            size += n
    if batch:
        yield batch


def _level(disk: str, ranges: list[tuple[int, int]], piece: int, remote, out: "Comparison",
           tick: Callable[[int], None] | None = None) -> list[int]:
    """Indexes (in pieces of `piece` bytes) within `ranges` whose digests differ."""
    d = digests.DIGEST_BYTES
    found: list[int] = []
    for batch in _batches(ranges, max(1, digests.MAX_REQUEST_BYTES // piece)):
        spans = [(first * piece, n * piece) for first, n in batch]
        answer = remote(spans, piece)          # asked first: S hashes while P does
        mine = digests.of_spans(disk, spans, piece)
        theirs = answer()
        out.digest_bytes += len(theirs)
        pieces = [first + i for first, n in batch for i in range(n)]
        found += [p for k, p in enumerate(pieces) if mine[k * d:(k + 1) * d] != theirs[k * d:(k + 1) * d]]
        if tick:
            tick(len(pieces))
    return found


def compare(disk: str, ranges: list[tuple[int, int]], region: int,
            remote: Callable[[list[tuple[int, int]], int], Callable[[], bytes]],
            progress: Callable[[int, int], None] | None = None, fanout: int = FANOUT) -> Comparison:
    """Pieces in `ranges` (region indexes) whose digests differ between P (`disk`) and S
    (`remote(spans, piece)` asks for (offset, length) spans, the call it returns waits for the
    answer), in two levels: a digest per `fanout` pieces first, then
    a digest per piece inside the groups that differ.  Digests then cost 16 bytes per 8 pieces
    compared plus 8 per changed piece: within 5 % of the changed bytes while at least one piece in
    38 compared changed (the benchmark's scattered writes: one in 32).  A lone 4 KiB change in a
    1 MiB era block still costs 40 digests (16 %): a smaller era block is the remedy there."""
    total = sum(r1 - r0 for r0, r1 in ranges)
    out = Comparison(candidate_pieces=total)
    done = [0]

    def tick(pieces: int) -> None:
        done[0] += pieces
        if progress:
            progress(done[0], total)

    # A first-level piece must fit one request: regions grow past 1 MiB on disks over 4 TiB.
    fanout = max(1, min(fanout, digests.MAX_REQUEST_BYTES // (region * SECTOR)))
    if fanout == 1:
        out.differing = _level(disk, merge(ranges), region * SECTOR, remote, out, tick)
        return out
    groups, fine = [], []
    for r0, r1 in ranges:
        g0, g1 = -(-r0 // fanout), r1 // fanout
        if g0 >= g1:
            fine.append((r0, r1))
            continue
        groups.append((g0, g1))
        fine += [r for r in ((r0, g0 * fanout), (g1 * fanout, r1)) if r[0] < r[1]]
    coarse = _level(disk, groups, region * SECTOR * fanout, remote, out, lambda n: tick(n * fanout))
    out.differing = sorted(set(
        _level(disk, merge(fine), region * SECTOR, remote, out, tick)
        + _level(disk, merge([(g * fanout, (g + 1) * fanout) for g in coarse]), region * SECTOR, remote, out)))
    return out


SENT_TARGET = 1.05     # a resync sends at most this times the differing bytes, digests included


def copy_budget(differing_bytes: int, digest_bytes: int) -> float:
    """What the copy may send, as a multiple of the differing bytes: the target less what the
    digests already sent (never below 1: the differing pieces themselves always go)."""
    if differing_bytes <= 0:
        return 1.0
    return max(1.0, SENT_TARGET - digest_bytes / differing_bytes)


def coarsen(differing: list[int], region: int, size_bytes: int, budget: float = SENT_TARGET,
            max_region: int = 1024) -> tuple[int, list[int]]:
    """The largest region (a power-of-two multiple of `region`, at most `max_region` sectors) whose
    copy of `differing` sends at most `budget` times the differing bytes; with its region indexes.

    The kernel's recovery pays a log write and a flush of both legs per region
    (docs/kernel-notes.md): clustered changes are copied in fewer, larger regions,
    scattered ones stay at the piece size."""
    if not differing:
        return region, []
    want = len(differing) * budget
    best, best_set = region, sorted(set(differing))
    r = region * 2
    while r <= max_region and size_bytes % (r * SECTOR) == 0:
        k = r // region
        coarse = sorted({d // k for d in differing})
        if len(coarse) * k > want:
            break
        best, best_set = r, coarse
        r *= 2
    return best, best_set
