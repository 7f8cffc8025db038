"""Digests of a disk's pieces: what the two hosts compare so that only differing pieces travel.

Both sides hash the same pieces (the resync's region size, 4 KiB on all but
huge disks) of the same range with BLAKE2b-128 and the primary compares:
16 bytes travel per piece instead of the piece (0.4 % of 4 KiB).  A request
covers at most MAX_REQUEST_BYTES, so that a reply fits one control-link frame.
"""

from __future__ import annotations

import base64
import hashlib

from dmrepl.kernel import blockdev

DIGEST_BYTES = 16
MAX_REQUEST_BYTES = 8 << 20
READ_BYTES = 1 << 20


def of(path: str, offset: int, length: int, piece: int) -> bytes:
    """The concatenated digests of the pieces of `path` in [offset, offset + length)."""
    if piece <= 0 or offset % piece or length % piece or length > MAX_REQUEST_BYTES or offset < 0:
        raise ValueError(f"digests: offset {offset} and length {length} must be multiples of the piece "
                         f"({piece}), length at most {MAX_REQUEST_BYTES}")
    out = bytearray()
    for start in range(offset, offset + length, READ_BYTES):
        data = blockdev.read_at(path, start, min(READ_BYTES, offset + length - start))
        for i in range(0, len(data), piece):
            out += hashlib.blake2b(data[i:i + piece], digest_size=DIGEST_BYTES).digest()
    return bytes(out)


def encode(d: bytes) -> str:
    return base64.b64encode(d).decode("ascii")


def decode(text: str, pieces: int) -> bytes:
    d = base64.b64decode(text.encode("ascii"), validate=True)
    if len(d) != pieces * DIGEST_BYTES:
        raise ValueError(f"digests: {len(d)} bytes for {pieces} pieces")
    return d
