"""Frames on the control link.

    magic "DMRL" | version u8 | kind u8 | reserved u16 | length u32 | payload | mac (32 bytes)

The payload is a JSON object (UTF-8).  The MAC is HMAC-SHA256 under the
session key over the direction, the sequence number, the header and the
payload; during the handshake (before a session key exists) frames carry a MAC
of zeroes and only the handshake's own kinds are accepted.  A frame longer
than MAX_PAYLOAD is refused from its header, before its payload is read.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import socket
import struct
from enum import IntEnum

MAGIC = b"DMRL"
VERSION = 1
MAX_PAYLOAD = 64 * 1024
MAC_BYTES = 32
HEADER = struct.Struct("!4sBBHI")


class Kind(IntEnum):
    # handshake (no session key yet)
    CHALLENGE = 1        # client -> server: its nonce
    PROOF = 2            # server -> client: its nonce and its proof of the key
    PROOF_REPLY = 3      # client -> server: its proof of the key
    # session (every frame MACed under the session key)
    HELLO = 10           # resource id, sizes, chunk and era block sizes, checkpoint history
    HELLO_OK = 11
    REFUSED = 12         # the peer refuses (another resource id, sizes differ): says why, then closes
    CHECKPOINT = 20      # primary -> secondary: take checkpoint n
    CHECKPOINT_DONE = 21  # secondary -> primary: checkpoint n taken (or failed, with the reason)
    STATUS = 30
    STATUS_REPLY = 31
    HEARTBEAT = 40
    EARLY_CHECKPOINT = 50  # secondary -> primary: the hidden store is filling, checkpoint soon
    EXPORT_RESTARTED = 51  # secondary -> primary: nbdkit died and was restarted: its NBD connections are gone
    DIGESTS = 60         # primary -> secondary: digests of S's pieces in up to 1024 [offset, length] spans
    DIGESTS_REPLY = 61   # secondary -> primary: those digests (base64), or the reason it cannot
    SWITCHOVER = 70      # primary -> secondary: checkpoint n was the last one, can you take over there?
    SWITCHOVER_READY = 71  # secondary -> primary: yes (or why not)
    SWITCHOVER_GO = 72   # primary -> secondary: this host's stack and NBD are gone: take over at n
    SWITCHOVER_DONE = 73  # secondary -> primary: took over at n (or why it could not)
    GROW = 80            # primary -> secondary: your stack at this new size (`dmrepl resize`)
    GROW_DONE = 81       # secondary -> primary: grown (or why not: then nothing changed)


HANDSHAKE_KINDS = {Kind.CHALLENGE, Kind.PROOF, Kind.PROOF_REPLY}


class FrameError(Exception):
    """A frame that is not one: garbage, another version, too long, a bad MAC, a closed peer."""


def mac(key: bytes, direction: bytes, seq: int, header: bytes, payload: bytes) -> bytes:
    return hmac.new(key, direction + seq.to_bytes(8, "big") + header + payload, hashlib.sha256).digest()


def encode(kind: Kind, body: dict, *, key: bytes | None, direction: bytes, seq: int) -> bytes:
    payload = json.dumps(body, separators=(",", ":"), sort_keys=True).encode()
    if len(payload) > MAX_PAYLOAD:
        raise FrameError(f"{kind.name} frame of {len(payload)} bytes is longer than {MAX_PAYLOAD}")
    header = HEADER.pack(MAGIC, VERSION, int(kind), 0, len(payload))
    tag = mac(key, direction, seq, header, payload) if key is not None else bytes(MAC_BYTES)
    return header + payload + tag


def _recv_exact(sock: socket.socket, n: int, what: str) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise FrameError(f"the peer closed the connection in the middle of {what}" if buf
                             else f"the peer closed the connection before {what}")
        buf += chunk
    return bytes(buf)


def decode(sock: socket.socket, *, key: bytes | None, direction: bytes, seq: int) -> tuple[Kind, dict]:
    """Read one frame; check everything before the payload is parsed or returned."""
    header = _recv_exact(sock, HEADER.size, "a frame header")
    magic, version, kind_raw, _reserved, length = HEADER.unpack(header)
    if magic != MAGIC:
        raise FrameError(f"not a dmrepl control link frame (magic {magic!r})")
    if version != VERSION:
        raise FrameError(f"control link version {version}, this dmrepl speaks {VERSION}: upgrade both hosts "
                         "to the same dmrepl")
    if length > MAX_PAYLOAD:
        raise FrameError(f"frame of {length} bytes is longer than {MAX_PAYLOAD}: refused unread")
    try:
        kind = Kind(kind_raw)
    except ValueError:
        raise FrameError(f"unknown frame kind {kind_raw}") from None
    payload = _recv_exact(sock, length, f"a {kind.name} frame")
    tag = _recv_exact(sock, MAC_BYTES, f"the MAC of a {kind.name} frame")
    if key is None:
        if kind not in HANDSHAKE_KINDS:
            raise FrameError(f"{kind.name} frame before authentication")
    else:
        if kind in HANDSHAKE_KINDS:
            raise FrameError(f"{kind.name} frame after authentication")
        if not hmac.compare_digest(tag, mac(key, direction, seq, header, payload)):
            raise FrameError(f"{kind.name} frame with a bad MAC (forged, replayed or out of order)")
    try:
        body = json.loads(payload)
    except ValueError:
        raise FrameError(f"{kind.name} frame whose payload is not JSON") from None
    if not isinstance(body, dict):
        raise FrameError(f"{kind.name} frame whose payload is not a JSON object")
    return kind, body
