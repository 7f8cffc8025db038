"""The pre-shared key and the HMAC challenge-response that opens every control link session.

    client -> server  CHALLENGE    nonce_c (32 random bytes)
    server -> client  PROOF        nonce_s, HMAC(psk, "dmrepl-server" | nonce_c | nonce_s)
    client -> server  PROOF_REPLY  HMAC(psk, "dmrepl-client" | nonce_s | nonce_c)
    session key = HMAC(psk, "dmrepl-session" | nonce_c | nonce_s)

Each side proves the key over the other side's fresh nonce, so a recorded
handshake replayed later proves nothing; every later frame is MACed under the
session key (dmrepl.link.frames), so a frame of another session does nothing.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import socket

from dmrepl import private
from dmrepl.errors import DmreplError
from dmrepl.link import frames
from dmrepl.link.frames import FrameError, Kind

NONCE_BYTES = 32
MIN_KEY_BYTES = 32


class AuthError(FrameError):
    """The peer did not prove the key (or did not follow the handshake)."""


class KeyFileError(DmreplError):
    pass


def load_key(path: str) -> bytes:
    """The pre-shared key from a file that only its owner (root) can read: hex, at least 32 bytes."""
    text = private.read_secret(path, "key file", KeyFileError, missing=(
        "create it on both hosts with the same key: `dmrepl keygen NAME` on one host, then copy the file "
        "to the other keeping its mode 0600")).strip()
    try:
        key = bytes.fromhex(text)
    except ValueError:
        raise KeyFileError(f"key file {path} does not hold a hex key") from None
    if len(key) < MIN_KEY_BYTES:
        raise KeyFileError(f"key file {path} holds {len(key)} bytes: at least {MIN_KEY_BYTES} are needed")
    return key


def write_new_key(path: str, replace: bool = True) -> None:
    """A fresh random key, written atomically with mode 0600; with replace=False an existing file
    is kept and KeyFileError raised (the other host may hold that key already)."""
    try:
        private.write_secret(path, os.urandom(MIN_KEY_BYTES).hex() + "\n", replace=replace)
    except FileExistsError:
        raise KeyFileError(f"key file {path} exists already: kept (the other host may use it)",
                           f"to make a new one, remove {path} on both hosts first") from None


def _proof(psk: bytes, label: bytes, first: bytes, second: bytes) -> bytes:
    return hmac.new(psk, label + first + second, hashlib.sha256).digest()


def _hex_field(body: dict, name: str, size: int, kind: Kind) -> bytes:
    value = body.get(name)
    try:
        raw = bytes.fromhex(value) if isinstance(value, str) else b""
    except ValueError:
        raw = b""
    if len(raw) != size:
        raise AuthError(f"{kind.name} without a valid {name}")
    return raw


def _expect(sock: socket.socket, kind: Kind) -> dict:
    got, body = frames.decode(sock, key=None, direction=b"", seq=0)
    if got != kind:
        raise AuthError(f"expected {kind.name} in the handshake, received {got.name}")
    return body


def client_handshake(sock: socket.socket, psk: bytes) -> bytes:
    """Prove the key to a server and check its proof; returns the session key."""
    nonce_c = os.urandom(NONCE_BYTES)
    sock.sendall(frames.encode(Kind.CHALLENGE, {"nonce": nonce_c.hex()}, key=None, direction=b"", seq=0))
    body = _expect(sock, Kind.PROOF)
    nonce_s = _hex_field(body, "nonce", NONCE_BYTES, Kind.PROOF)
    proof = _hex_field(body, "proof", 32, Kind.PROOF)
    if not hmac.compare_digest(proof, _proof(psk, b"dmrepl-server", nonce_c, nonce_s)):
        raise AuthError("the server's proof does not match our key: the two hosts have different keys")
    reply = _proof(psk, b"dmrepl-client", nonce_s, nonce_c)
    sock.sendall(frames.encode(Kind.PROOF_REPLY, {"proof": reply.hex()}, key=None, direction=b"", seq=0))
    return _proof(psk, b"dmrepl-session", nonce_c, nonce_s)


def server_handshake(sock: socket.socket, psk: bytes) -> bytes:
    """Check a client's proof of the key after proving ours; returns the session key."""
    body = _expect(sock, Kind.CHALLENGE)
    nonce_c = _hex_field(body, "nonce", NONCE_BYTES, Kind.CHALLENGE)
    nonce_s = os.urandom(NONCE_BYTES)
    proof = _proof(psk, b"dmrepl-server", nonce_c, nonce_s)
    sock.sendall(frames.encode(Kind.PROOF, {"nonce": nonce_s.hex(), "proof": proof.hex()}, key=None,
                               direction=b"", seq=0))
    body = _expect(sock, Kind.PROOF_REPLY)
    reply = _hex_field(body, "proof", 32, Kind.PROOF_REPLY)
    if not hmac.compare_digest(reply, _proof(psk, b"dmrepl-client", nonce_s, nonce_c)):
        raise AuthError("the client's proof does not match our key: the two hosts have different keys")
    return _proof(psk, b"dmrepl-session", nonce_c, nonce_s)
