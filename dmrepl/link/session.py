"""An authenticated control link connection: typed messages with per-direction sequence numbers.

    with Session.connect(host, port, psk) as s:      # the primary's side
        s.send(Kind.HELLO, {...}); kind, body = s.recv(timeout=5)
    srv = Listener(host, port, psk); s = srv.accept()  # the secondary's side

Any error (a bad frame, a bad MAC, a timeout) closes the session: a stream that
failed once cannot be trusted, and the peer reconnects with a new handshake.
"""

from __future__ import annotations

import socket
import threading
import time

from dmrepl.link import auth, frames
from dmrepl.link.frames import FrameError, Kind

HANDSHAKE_TIMEOUT = 10.0


class Session:
    def __init__(self, sock: socket.socket, key: bytes, *, client: bool, peer: str):
        self.sock = sock
        self._key = key
        self._send_dir, self._recv_dir = (b"c2s", b"s2c") if client else (b"s2c", b"c2s")
        self._send_seq = 0
        self._recv_seq = 0
        self._send_lock = threading.Lock()   # the secondary's watch sends EARLY_CHECKPOINT beside serve()
        self.peer = peer
        self.last_recv = time.monotonic()    # when the peer last sent a frame (liveness, whoever read it)
        self.closed_why: str | None = None   # a send that failed on another thread says why here

    @classmethod
    def connect(cls, host: str, port: int, psk: bytes, *, timeout: float = HANDSHAKE_TIMEOUT) -> "Session":
        sock = socket.create_connection((host, port), timeout=timeout)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            key = auth.client_handshake(sock, psk)
        except BaseException:
            sock.close()
            raise
        return cls(sock, key, client=True, peer=f"{host}:{port}")

    def _check_open(self) -> None:
        """Not a bare EBADF once another thread's send broke the session: why it did.  An OSError,
        as the failed send was, for the callers that catch only that."""
        if self.closed_why is not None:
            raise ConnectionAbortedError(f"the session was closed: {self.closed_why}")

    def send(self, kind: Kind, body: dict) -> None:
        with self._send_lock:
            self._check_open()
            data = frames.encode(kind, body, key=self._key, direction=self._send_dir, seq=self._send_seq)
            self._send_seq += 1
            try:
                self.sock.sendall(data)
            except OSError as e:
                self.closed_why = f"sending {kind.name} failed: {e.strerror or e}"
                self.close()
                raise

    def recv(self, timeout: float | None = None) -> tuple[Kind, dict]:
        self._check_open()
        self.sock.settimeout(timeout)
        try:
            kind, body = frames.decode(self.sock, key=self._key, direction=self._recv_dir, seq=self._recv_seq)
        except (FrameError, OSError):
            self.close()
            raise
        self._recv_seq += 1
        self.last_recv = time.monotonic()
        return kind, body

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Listener:
    """A listening socket that hands out authenticated sessions; refused peers are reported, not fatal."""

    def __init__(self, host: str, port: int, psk: bytes):
        self.psk = psk
        self.sock = socket.create_server((host, port), reuse_port=False)
        self.host, self.port = self.sock.getsockname()[:2]

    def accept(self, timeout: float | None = None) -> Session:
        """The next peer that proves the key; raises FrameError (with the peer's address) for one that
        does not -- the caller logs it and accepts again."""
        self.sock.settimeout(timeout)
        conn, addr = self.sock.accept()
        peer = f"{addr[0]}:{addr[1]}"
        conn.settimeout(HANDSHAKE_TIMEOUT)
        try:
            key = auth.server_handshake(conn, self.psk)
        except (FrameError, OSError) as e:
            conn.close()
            raise FrameError(f"peer {peer}: {e}") from None
        return Session(conn, key, client=False, peer=peer)

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> "Listener":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
