"""Digests of a disk's pieces: what the two hosts compare so that only differing pieces travel.

Both sides hash the same pieces (the resync's region size, 4 KiB on all but
huge disks) of the same spans with BLAKE2b-128 and the primary compares:
16 bytes travel per piece instead of the piece (0.4 % of 4 KiB).  A request
covers at most MAX_REQUEST_BYTES in at most MAX_SPANS spans, so that a reply
fits one control-link frame and scattered pieces need few round trips.
"""

from __future__ import annotations

import base64
import hashlib

from dmrepl.kernel import blockdev

DIGEST_BYTES = 16
MAX_REQUEST_BYTES = 8 << 20
MAX_SPANS = 1024          # spans in one request: scattered pieces go in few round trips
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


def of_spans(path: str, spans: list[tuple[int, int]], piece: int) -> bytes:
    """The concatenated digests of the pieces of every (offset, length) span, in order."""
    if not 0 < len(spans) <= MAX_SPANS or sum(n for _o, n in spans) > MAX_REQUEST_BYTES:
        raise ValueError(f"digests: 1 to {MAX_SPANS} spans of at most {MAX_REQUEST_BYTES} bytes in all, "
                         f"not {len(spans)} of {sum(n for _o, n in spans)}")
    return b"".join(of(path, off, n, piece) for off, n in spans)


def spans_from_wire(value) -> list[tuple[int, int]]:
    """A request's spans: a list of [offset, length] pairs of integers (ValueError otherwise)."""
    if not isinstance(value, list):
        raise ValueError("digests: spans must be a list of [offset, length]")
    out = []
    for span in value:
        if not (isinstance(span, list) and len(span) == 2 and all(type(x) is int for x in span)):
            raise ValueError(f"digests: span {span!r} is not [offset, length]")
        out.append((span[0], span[1]))
    return out


def encode(d: bytes) -> str:
    return base64.b64encode(d).decode("ascii")


def decode(text: str, pieces: int) -> bytes:
    d = base64.b64decode(text.encode("ascii"), validate=True)
    if len(d) != pieces * DIGEST_BYTES:
        raise ValueError(f"digests: {len(d)} bytes for {pieces} pieces")
    return d
