"""dm-mirror's "disk" dirty log, written and read by dmrepl: which regions a recovery copies.

On the log device (drivers/md/dm-log.c: header_to_disk, read_header; the
facts and their evidence are in docs/kernel-notes.md):

    byte 0     le32 magic 0x4D695272 ("MiRr"), le32 version 2, le64 number of regions
    byte 1024  the clean bitset: region r is bit r % 8 of byte 1024 + r // 8;
               1 = in sync, 0 = to be copied; round_up(regions, 32) / 8 bytes

The kernel reads it at every resume of a mirror whose table names the device
(not at load), starts its recovery from the zeros, and writes it back when the
mirror flushes its log and at suspend.  dmrepl writes the zeros it wants copied
before the resume and reads the bitset after a suspend to learn whether every
region really was copied (a failed copy leaves its bit at 0; the mirror's
status alone would say "in sync": docs/resync-research.md, trap 1).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Iterable

from dmrepl.kernel import blockdev

MAGIC = 0x4D695272
VERSION = 2
BITSET_OFFSET = 1024
_HEADER = struct.Struct("<IIQ")


class LogFormatError(ValueError):
    pass


def bitset_bytes(regions: int) -> int:
    return (regions + 31) // 32 * 4


def device_bytes(regions: int, block: int = 4096) -> int:
    """How large the log device must be for `regions` regions (the kernel rounds to its block size)."""
    need = BITSET_OFFSET + bitset_bytes(regions)
    return (need + block - 1) // block * block


@dataclass(frozen=True)
class Bitmap:
    """Which regions are in sync: `out_of_sync` holds the others."""

    regions: int
    out_of_sync: frozenset[int]

    @classmethod
    def with_zeros(cls, regions: int, zeros: Iterable[int]) -> "Bitmap":
        z = frozenset(zeros)
        bad = [r for r in z if not 0 <= r < regions]
        if bad:
            raise ValueError(f"regions {sorted(bad)[:3]} outside 0..{regions - 1}")
        return cls(regions, z)

    @property
    def all_in_sync(self) -> bool:
        return not self.out_of_sync

    def encode(self, block: int = 4096) -> bytes:
        bits = bytearray(b"\xff" * bitset_bytes(self.regions))
        for r in self.out_of_sync:
            bits[r // 8] &= ~(1 << (r % 8)) & 0xFF
        head = _HEADER.pack(MAGIC, VERSION, self.regions).ljust(BITSET_OFFSET, b"\0")
        return (head + bytes(bits)).ljust(device_bytes(self.regions, block), b"\0")

    @classmethod
    def decode(cls, data: bytes) -> "Bitmap":
        if len(data) < BITSET_OFFSET:
            raise LogFormatError(f"mirror log of {len(data)} bytes: shorter than its header")
        magic, version, regions = _HEADER.unpack_from(data)
        if magic != MAGIC:
            raise LogFormatError(f"mirror log magic {magic:#x}, expected {MAGIC:#x}")
        if version != VERSION:
            raise LogFormatError(f"mirror log version {version}, expected {VERSION}")
        bits = data[BITSET_OFFSET:BITSET_OFFSET + bitset_bytes(regions)]
        if len(bits) < bitset_bytes(regions):
            raise LogFormatError(f"mirror log of {len(data)} bytes cannot hold {regions} regions")
        zeros = []
        for i, byte in enumerate(bits):
            if byte != 0xFF:
                zeros += [i * 8 + k for k in range(8) if not byte >> k & 1 and i * 8 + k < regions]
        return cls(regions, frozenset(zeros))


def write(device: str, bitmap: Bitmap) -> None:
    blockdev.write_at(device, 0, bitmap.encode(blockdev.logical_block_size(device)))


def read(device: str, regions: int) -> Bitmap:
    return Bitmap.decode(blockdev.read_at(device, 0, device_bytes(regions, blockdev.logical_block_size(device))))
