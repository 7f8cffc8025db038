"""dm-snapshot's persistent COW store: which origin chunks have an exception, read from userspace.

On the store (drivers/md/dm-snap-persistent.c; little-endian; a chunk is chunk_sectors * 512 bytes):

    chunk 0            header: le32 magic 0x70416e53 ("SnAp"), le32 valid, le32 version 1,
                       le32 chunk size in sectors (it overrides the table's: read_header)
    chunk 1 + i*(E+1)  metadata area i, E = chunk bytes // 16 entries of
                       {le64 old_chunk (origin), le64 new_chunk (in the store)};
                       the E chunks after it hold the data its entries point at

The table ends at the first entry whose new_chunk is 0, which would point at the header
(insert_exceptions); only an area whose E entries are all used goes on to the next one, which
the kernel zeroes before it writes the full one (persistent_commit_exception).  A merge clears
entries from the end, old and new both 0 (persistent_commit_merge): the same rule holds.
magic 0 is a store the kernel has not initialised yet (it writes the header at the first load);
valid 0 is a snapshot the kernel invalidated (persistent_drop_snapshot): it no longer reads the
table, and neither does this module.

The kernel writes an area (REQ_PREFLUSH | REQ_FUA) before it completes the write that needed
the exception, so a completed write's chunk is in the table.  Read the store while its snapshot
and origin are suspended, else a concurrent commit can change it under the reader.  Reads go
through blockdev.read_at: O_DIRECT on a block device, whose own page cache could be stale.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from dmrepl.kernel import blockdev

MAGIC = 0x70416E53
VERSION = 1
ENTRY_BYTES = 16
_HEADER = struct.Struct("<IIII")
_HEADER_READ_BYTES = 4096  # a whole logical block whatever the device's; the header is its first 16 bytes


class CowStoreError(ValueError):
    """Not a persistent COW store the kernel would read, or a truncated one."""


class InvalidatedError(CowStoreError):
    """The kernel invalidated the snapshot (header valid = 0): its table means nothing."""


@dataclass(frozen=True)
class CowTable:
    """The origin chunks (units of chunk_sectors) that have an exception in the store."""

    chunk_sectors: int
    chunks: frozenset[int]

    @property
    def chunk_bytes(self) -> int:
        return self.chunk_sectors * blockdev.SECTOR_BYTES

    def extents_bytes(self) -> list[tuple[int, int]]:
        """(offset_bytes, length_bytes) of the origin the chunks cover, sorted, adjacent ones merged."""
        runs: list[list[int]] = []
        for c in sorted(self.chunks):
            if runs and runs[-1][1] == c:
                runs[-1][1] = c + 1
            else:
                runs.append([c, c + 1])
        return [(first * self.chunk_bytes, (end - first) * self.chunk_bytes) for first, end in runs]


def area_chunk(area: int, entries_per_area: int) -> int:
    """dm-snap-persistent.c: area_location."""
    return 1 + area * (entries_per_area + 1)


def read(path: str) -> CowTable | None:
    """The store's table; None if its header is zeroed (a store no snapshot has used yet)."""
    head = blockdev.read_at(path, 0, _HEADER_READ_BYTES)
    if len(head) < _HEADER.size:
        raise CowStoreError(f"{path}: {len(head)} bytes, shorter than a COW store header")
    magic, valid, version, chunk_sectors = _HEADER.unpack_from(head)
    if magic == 0:
        return None
    if magic != MAGIC:
        raise CowStoreError(f"{path}: magic {magic:#x}, not a persistent COW store ({MAGIC:#x})")
    if version != VERSION:
        raise CowStoreError(f"{path}: COW store version {version}, expected {VERSION}")
    if not valid:
        raise InvalidatedError(f"{path}: the kernel invalidated this snapshot (header valid = 0)")
    if chunk_sectors <= 0 or chunk_sectors & (chunk_sectors - 1):
        raise CowStoreError(f"{path}: COW store chunk size {chunk_sectors} sectors is not a power of two")
    chunk_bytes = chunk_sectors * blockdev.SECTOR_BYTES
    per_area = chunk_bytes // ENTRY_BYTES
    chunks: set[int] = set()
    area = 0
    while True:
        data = blockdev.read_at(path, area_chunk(area, per_area) * chunk_bytes, chunk_bytes)
        if len(data) < chunk_bytes:
            raise CowStoreError(f"{path}: COW store ends inside metadata area {area} "
                                f"(chunk {area_chunk(area, per_area)}, {chunk_sectors} sectors a chunk)")
        for old_chunk, new_chunk in struct.iter_unpack("<QQ", data):
            if new_chunk == 0:
                return CowTable(chunk_sectors, frozenset(chunks))
            chunks.add(old_chunk)
        area += 1
