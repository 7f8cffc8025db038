"""X25519 (RFC 7748, section 5): a WireGuard key pair without a crypto library or `wg`.

WireGuard's keys are Curve25519 scalars and their public points, base64.  Only `dmrepl keygen`
uses this, once, offline on the host that keeps the private key: Python's integers are not
constant-time, which matters for a key used in live exchanges an attacker can time, not here
(the kernel's WireGuard does every exchange).
"""

from __future__ import annotations

import base64
import os

P = 2 ** 255 - 19
A24 = 121665
BASE_U = (9).to_bytes(32, "little")


def _scalar(k: bytes) -> int:
    b = bytearray(k)
    b[0] &= 248
    b[31] &= 127
    b[31] |= 64
    return int.from_bytes(b, "little")


def x25519(k: bytes, u: bytes) -> bytes:
    """The scalar multiplication k * u on Curve25519's Montgomery form (the ladder of RFC 7748)."""
    if len(k) != 32 or len(u) != 32:
        raise ValueError("x25519: scalar and u-coordinate are 32 bytes each")
    n = _scalar(k)
    x1 = int.from_bytes(u[:31] + bytes([u[31] & 127]), "little") % P
    x2, z2, x3, z3, swap = 1, 0, x1, 1, 0
    for t in reversed(range(255)):
        bit = (n >> t) & 1
        if swap ^ bit:
            x2, x3, z2, z3 = x3, x2, z3, z2
        swap = bit
        a, b = (x2 + z2) % P, (x2 - z2) % P
        aa, bb = a * a % P, b * b % P
        e = (aa - bb) % P
        c, d = (x3 + z3) % P, (x3 - z3) % P
        da, cb = d * a % P, c * b % P
        x3, z3 = (da + cb) ** 2 % P, x1 * (da - cb) ** 2 % P
        x2, z2 = aa * bb % P, e * (aa + A24 * e) % P
    if swap:
        x2, z2 = x3, z3
    return (x2 * pow(z2, P - 2, P) % P).to_bytes(32, "little")


def new_private() -> bytes:
    """32 random bytes, clamped as WireGuard stores a private key."""
    b = bytearray(os.urandom(32))
    b[0] &= 248
    b[31] = (b[31] & 127) | 64
    return bytes(b)


def public(private: bytes) -> bytes:
    return x25519(private, BASE_U)


def encode(key: bytes) -> str:
    return base64.b64encode(key).decode("ascii")


def decode(text: str) -> bytes:
    """A base64 WireGuard key (ValueError unless it is 32 bytes)."""
    try:
        key = base64.b64decode(text.strip().encode("ascii"), validate=True)
    except (ValueError, UnicodeEncodeError):
        raise ValueError("not a base64 WireGuard key") from None
    if len(key) != 32:
        raise ValueError(f"a WireGuard key is 32 bytes, this one {len(key)}")
    return key
