"""A small synchronous NBD client in the transmission phase: simple replies only.

Follows the NBD protocol document, doc/proto.md of NetworkBlockDevice/nbd; quoted
section names refer to it.  The negotiation is in handshake.py (the kernel NBD
path reuses it), the constants and errors in protocol.py.
"""

from __future__ import annotations

import socket

from dmrepl.nbd.handshake import check_magic, handshake, recv_exact, recv_into, send
from dmrepl.nbd.protocol import (
    COMMAND_NAMES,
    MAX_REQUEST_BYTES,
    NBD_CMD_DISC,
    NBD_CMD_FLAG_FUA,
    NBD_CMD_FLUSH,
    NBD_CMD_READ,
    NBD_CMD_TRIM,
    NBD_CMD_WRITE,
    NBD_FLAG_SEND_FLUSH,
    NBD_FLAG_SEND_FUA,
    NBD_FLAG_SEND_TRIM,
    NBD_REQUEST_MAGIC,
    NBD_SIMPLE_REPLY_MAGIC,
    NBD_STRUCTURED_REPLY_MAGIC,
    REQUEST,
    SIMPLE_REPLY,
    ExportInfo,
    NBDError,
    NBDProtocolError,
)


class NBDClient:
    """One NBD connection in the transmission phase, one request in flight at a time.

    Requests are synchronous, so every reply must carry the handle just sent.  After
    an NBDProtocolError the socket is closed: the stream cannot be trusted any more.
    """

    def __init__(self, sock: socket.socket, info: ExportInfo):
        self._sock: socket.socket | None = sock
        self.info = info
        self._next_handle = 1

    @classmethod
    def connect(cls, host: str, port: int, export_name: str = "", timeout: float = 10.0) -> NBDClient:
        """Connect over TCP and negotiate export_name; timeout bounds every later send and receive too."""
        sock = socket.create_connection((host, port), timeout=timeout)
        try:
            # A request header and its data go out in separate sends: do not let Nagle hold them.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            info = handshake(sock, export_name)
        except BaseException:
            sock.close()
            raise
        return cls(sock, info)

    def __enter__(self) -> NBDClient:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def read(self, offset_bytes: int, length: int) -> bytes:
        """Read length bytes at offset_bytes, in requests of at most MAX_REQUEST_BYTES."""
        self._check_range("NBD_CMD_READ", offset_bytes, length)
        buf = bytearray(length)
        view = memoryview(buf)
        for start in range(0, length, MAX_REQUEST_BYTES):
            chunk = view[start:start + MAX_REQUEST_BYTES]
            self._request(NBD_CMD_READ, offset_bytes + start, len(chunk), reply_into=chunk)
        return bytes(buf)

    def write(self, offset_bytes: int, data: bytes | bytearray | memoryview, fua: bool = False) -> None:
        """Write data at offset_bytes; with fua each request is persisted before it completes."""
        self._require_writable("NBD_CMD_WRITE")
        flags = 0
        if fua:
            self._require(NBD_FLAG_SEND_FUA, "NBD_FLAG_SEND_FUA", "NBD_CMD_WRITE with FUA")
            flags = NBD_CMD_FLAG_FUA
        view = memoryview(data).cast("B")
        self._check_range("NBD_CMD_WRITE", offset_bytes, len(view))
        for start in range(0, len(view), MAX_REQUEST_BYTES):
            chunk = view[start:start + MAX_REQUEST_BYTES]
            self._request(NBD_CMD_WRITE, offset_bytes + start, len(chunk), flags=flags, payload=chunk)

    def flush(self) -> None:
        """Persist every write the server has completed so far ("Ordering of messages and writes")."""
        self._require(NBD_FLAG_SEND_FLUSH, "NBD_FLAG_SEND_FLUSH", "NBD_CMD_FLUSH")
        self._request(NBD_CMD_FLUSH, 0, 0)

    def trim(self, offset_bytes: int, length: int) -> None:
        """Discard a range; what it reads back as afterwards is up to the server."""
        self._require_writable("NBD_CMD_TRIM")
        self._require(NBD_FLAG_SEND_TRIM, "NBD_FLAG_SEND_TRIM", "NBD_CMD_TRIM")
        self._check_range("NBD_CMD_TRIM", offset_bytes, length)
        for start in range(0, length, MAX_REQUEST_BYTES):
            self._request(NBD_CMD_TRIM, offset_bytes + start, min(MAX_REQUEST_BYTES, length - start))

    def close(self) -> None:
        """Soft disconnect (NBD_CMD_DISC, which has no reply) and close; safe to call twice."""
        sock, self._sock = self._sock, None
        if sock is None:
            return
        try:
            sock.sendall(REQUEST.pack(NBD_REQUEST_MAGIC, 0, NBD_CMD_DISC, self._take_handle(), 0, 0))
        except OSError:
            pass  # the server is gone already; closing is all that is left
        finally:
            sock.close()

    def _require(self, flag: int, flag_name: str, what: str) -> None:
        if not self.info.transmission_flags & flag:
            raise ValueError(f"{what}: the server did not advertise {flag_name}")

    def _require_writable(self, what: str) -> None:
        if self.info.read_only:
            raise ValueError(f"{what}: the export is read-only (NBD_FLAG_READ_ONLY)")

    def _check_range(self, what: str, offset_bytes: int, length: int) -> None:
        if offset_bytes < 0 or length < 0 or offset_bytes + length > self.info.size_bytes:
            raise ValueError(f"{what}: offset {offset_bytes} length {length} is outside the export "
                             f"of {self.info.size_bytes} bytes")

    def _take_handle(self) -> int:
        handle = self._next_handle
        self._next_handle += 1
        return handle

    def _request(self, command: int, offset_bytes: int, length: int, flags: int = 0,
                 payload: memoryview | None = None, reply_into: memoryview | None = None) -> None:
        """Send one request and wait for its simple reply; the one choke point for commands."""
        name = COMMAND_NAMES[command]
        error = self._exchange(name, command, offset_bytes, length, flags, payload, reply_into)
        if error:
            # A simple reply with an error carries no data, so the stream is still in step.
            raise NBDError(error, name, f"offset {offset_bytes} length {length}")

    def _exchange(self, name: str, command: int, offset_bytes: int, length: int, flags: int,
                  payload: memoryview | None, reply_into: memoryview | None) -> int:
        sock = self._sock
        if sock is None:
            raise ValueError(f"{name}: the NBD connection is closed")
        handle = self._take_handle()
        try:
            send(sock, REQUEST.pack(NBD_REQUEST_MAGIC, flags, command, handle, offset_bytes, length),
                  f"{name} request")
            if payload is not None:
                send(sock, payload, f"{name} data")
            magic, error, reply_handle = SIMPLE_REPLY.unpack(
                recv_exact(sock, SIMPLE_REPLY.size, f"{name} reply header"))
            if magic == NBD_STRUCTURED_REPLY_MAGIC:
                raise NBDProtocolError(f"expected a simple reply to {name}, received a structured reply, "
                                       "which was never negotiated")
            check_magic(f"{name} reply", NBD_SIMPLE_REPLY_MAGIC, magic)
            if reply_handle != handle:
                raise NBDProtocolError(f"expected a reply to {name} handle {handle}, "
                                       f"received one for handle {reply_handle}")
            if not error and reply_into is not None:
                recv_into(sock, reply_into, f"{name} data")
            return error
        except (OSError, NBDProtocolError):
            self._sock = None
            sock.close()
            raise
