"""A small synchronous NBD client: fixed newstyle handshake, then simple replies only.

Follows the NBD protocol document, doc/proto.md of NetworkBlockDevice/nbd; quoted
section names refer to it.  handshake() is separate from NBDClient because the
kernel NBD path reuses it: it negotiates on a connected socket and leaves that
socket at the start of the transmission phase, ready for NBD_SET_SOCK.  For the
same reason structured replies are never negotiated: the kernel NBD client only
understands simple replies.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from dataclasses import dataclass

# Handshake magics ("Newstyle negotiation", "Fixed newstyle negotiation").
NBDMAGIC = 0x4E42444D41474943            # "NBDMAGIC": the first 8 bytes from any server
IHAVEOPT = 0x49484156454F5054            # "IHAVEOPT": newstyle greeting, and the prefix of each option
CLISERV_MAGIC = 0x00420281861253         # sent instead of IHAVEOPT by oldstyle servers (unsupported)
OPTION_REPLY_MAGIC = 0x0003E889045565A9  # prefix of every option reply

# Handshake flags (server, 16 bits) and client flags (32 bits).
NBD_FLAG_FIXED_NEWSTYLE = 1 << 0    # server speaks fixed newstyle: options get replies
NBD_FLAG_NO_ZEROES = 1 << 1         # server can drop the 124 zero bytes after NBD_OPT_EXPORT_NAME
NBD_FLAG_C_FIXED_NEWSTYLE = 1 << 0  # client speaks fixed newstyle
NBD_FLAG_C_NO_ZEROES = 1 << 1       # client does not want those zero bytes

# Options, option replies and information types ("Option types", "Option reply types").
NBD_OPT_ABORT = 2     # client ends negotiation (soft disconnect)
NBD_OPT_GO = 7        # choose an export and enter transmission; unlike NBD_OPT_EXPORT_NAME it can fail
NBD_REP_ACK = 1       # option accepted; ends the replies to NBD_OPT_GO
NBD_REP_INFO = 3      # one piece of information about the export
NBD_INFO_EXPORT = 0   # size and transmission flags; mandatory before NBD_REP_ACK
NBD_REP_FLAG_ERROR = 1 << 31  # set in every NBD_REP_ERR_* reply type

# Option error replies; the payload, if any, is a message for humans.
NBD_REP_ERR_UNSUP = NBD_REP_FLAG_ERROR | 1            # option unknown to the server
NBD_REP_ERR_POLICY = NBD_REP_FLAG_ERROR | 2           # server policy forbids the option
NBD_REP_ERR_INVALID = NBD_REP_FLAG_ERROR | 3          # option syntactically invalid
NBD_REP_ERR_PLATFORM = NBD_REP_FLAG_ERROR | 4         # option unsupported on the server's platform
NBD_REP_ERR_TLS_REQD = NBD_REP_FLAG_ERROR | 5         # server wants TLS first
NBD_REP_ERR_UNKNOWN = NBD_REP_FLAG_ERROR | 6          # no such export
NBD_REP_ERR_SHUTDOWN = NBD_REP_FLAG_ERROR | 7         # server is shutting down
NBD_REP_ERR_BLOCK_SIZE_REQD = NBD_REP_FLAG_ERROR | 8  # client must request NBD_INFO_BLOCK_SIZE
NBD_REP_ERR_TOO_BIG = NBD_REP_FLAG_ERROR | 9          # request or reply too large

# Transmission flags, sent with NBD_INFO_EXPORT ("Transmission flags").
NBD_FLAG_HAS_FLAGS = 1 << 0   # always set; the other bits mean nothing without it
NBD_FLAG_READ_ONLY = 1 << 1   # writes and trims will fail
NBD_FLAG_SEND_FLUSH = 1 << 2  # NBD_CMD_FLUSH is supported
NBD_FLAG_SEND_FUA = 1 << 3    # NBD_CMD_FLAG_FUA is supported
NBD_FLAG_SEND_TRIM = 1 << 5   # NBD_CMD_TRIM is supported

# Transmission phase ("Request message", "Simple reply message", "Request types").
NBD_REQUEST_MAGIC = 0x25609513           # prefix of every request
NBD_SIMPLE_REPLY_MAGIC = 0x67446698      # prefix of every simple reply
NBD_STRUCTURED_REPLY_MAGIC = 0x668E33EF  # structured reply: never negotiated here, so always an error
NBD_CMD_READ = 0          # reply carries the data
NBD_CMD_WRITE = 1         # request carries the data
NBD_CMD_DISC = 2          # soft disconnect; the server sends no reply
NBD_CMD_FLUSH = 3         # persist all completed writes
NBD_CMD_TRIM = 4          # discard a range (may read back as zeroes, or not)
NBD_CMD_FLAG_FUA = 1 << 0  # persist this write before replying

# "Block size constraints": without negotiation a client SHOULD NOT exceed 32 MiB per request.
MAX_REQUEST_BYTES = 32 * 1024 * 1024
# Strings are at most 4096 bytes ("Conventions"); a larger option reply is garbage, not data.
MAX_OPTION_REPLY_BYTES = 64 * 1024
MAX_EXPORT_NAME_BYTES = 4096

# Wire formats, network byte order.
_GREETING = struct.Struct("!QQH")        # NBDMAGIC, IHAVEOPT, handshake flags
_OPTION = struct.Struct("!QII")          # IHAVEOPT, option, data length
_OPTION_REPLY = struct.Struct("!QIII")   # magic, option, reply type, data length
_U16 = struct.Struct("!H")
_U32 = struct.Struct("!I")               # client flags; export name length
_INFO_EXPORT = struct.Struct("!HQH")     # NBD_INFO_EXPORT, size in bytes, transmission flags
_REQUEST = struct.Struct("!IHHQQI")      # magic, command flags, type, handle, offset, length
_SIMPLE_REPLY = struct.Struct("!IIQ")    # magic, error, handle

# How an option error reads, and the nearest errno for callers that catch OSError.
_REP_ERRORS: dict[int, tuple[str, str, int]] = {
    NBD_REP_ERR_UNSUP: ("NBD_REP_ERR_UNSUP", "option not supported", errno.EOPNOTSUPP),
    NBD_REP_ERR_POLICY: ("NBD_REP_ERR_POLICY", "forbidden by server policy", errno.EPERM),
    NBD_REP_ERR_INVALID: ("NBD_REP_ERR_INVALID", "invalid option", errno.EINVAL),
    NBD_REP_ERR_PLATFORM: ("NBD_REP_ERR_PLATFORM", "unsupported on the server's platform",
                           errno.EOPNOTSUPP),
    NBD_REP_ERR_TLS_REQD: ("NBD_REP_ERR_TLS_REQD", "server requires TLS", errno.EACCES),
    NBD_REP_ERR_UNKNOWN: ("NBD_REP_ERR_UNKNOWN", "export not found", errno.ENOENT),
    NBD_REP_ERR_SHUTDOWN: ("NBD_REP_ERR_SHUTDOWN", "server is shutting down", errno.ESHUTDOWN),
    NBD_REP_ERR_BLOCK_SIZE_REQD: ("NBD_REP_ERR_BLOCK_SIZE_REQD", "server requires block size negotiation",
                                  errno.EINVAL),
    NBD_REP_ERR_TOO_BIG: ("NBD_REP_ERR_TOO_BIG", "request too big", errno.E2BIG),
}

_COMMAND_NAMES = {
    NBD_CMD_READ: "NBD_CMD_READ",
    NBD_CMD_WRITE: "NBD_CMD_WRITE",
    NBD_CMD_DISC: "NBD_CMD_DISC",
    NBD_CMD_FLUSH: "NBD_CMD_FLUSH",
    NBD_CMD_TRIM: "NBD_CMD_TRIM",
}


class NBDError(OSError):
    """The server failed a request; ``errno`` is the error it sent.

    NBD error values are Linux errno numbers ("Error values"), so they are kept as
    sent.  str() reads ``NBD_CMD_WRITE offset 4096 length 512: Input/output error (EIO)``.
    """

    def __init__(self, err: int, call: str, obj: str | None = None):
        super().__init__(err, os.strerror(err))
        self.call = call
        self.obj = obj

    def __str__(self) -> str:
        name = errno.errorcode.get(self.errno, str(self.errno))
        where = f"{self.call} {self.obj}" if self.obj else self.call
        return f"{where}: {self.strerror} ({name})"

    def __reduce__(self):
        return (type(self), (self.errno, self.call, self.obj))


class NBDOptionError(NBDError):
    """The server refused an option during the handshake with an NBD_REP_ERR_* reply.

    ``reply`` is the exact reply type to branch on; ``errno`` is only its nearest
    equivalent.  str() reads ``NBD_OPT_GO export 'vm1': export not found (NBD_REP_ERR_UNKNOWN)``
    followed by the server's own message, if it sent one.
    """

    def __init__(self, reply: int, call: str, obj: str | None = None, message: str = ""):
        unknown = (f"NBD_REP_ERR {reply:#x}", "unknown option error", errno.EIO)
        self.reply_name, self.meaning, err = _REP_ERRORS.get(reply, unknown)
        super().__init__(err, call, obj)
        self.reply = reply
        self.message = message

    def __str__(self) -> str:
        where = f"{self.call} {self.obj}" if self.obj else self.call
        text = f"{where}: {self.meaning} ({self.reply_name})"
        return f"{text}: {self.message}" if self.message else text

    def __reduce__(self):
        return (type(self), (self.reply, self.call, self.obj, self.message))


class NBDProtocolError(Exception):
    """The server broke the protocol, or the connection broke or stalled mid-message.

    The message says what was expected and what was received.  The byte stream is
    out of step afterwards, so the connection cannot be used any more.
    """


@dataclass(frozen=True)
class ExportInfo:
    """What NBD_INFO_EXPORT says about the export."""

    size_bytes: int
    transmission_flags: int

    @property
    def read_only(self) -> bool:
        return bool(self.transmission_flags & NBD_FLAG_READ_ONLY)

    @property
    def can_flush(self) -> bool:
        return bool(self.transmission_flags & NBD_FLAG_SEND_FLUSH)

    @property
    def can_fua(self) -> bool:
        return bool(self.transmission_flags & NBD_FLAG_SEND_FUA)

    @property
    def can_trim(self) -> bool:
        return bool(self.transmission_flags & NBD_FLAG_SEND_TRIM)


def _recv_into(sock: socket.socket, view: memoryview, what: str) -> None:
    """Fill view from sock, or raise NBDProtocolError; a short read never returns quietly."""
    got = 0
    while got < len(view):
        try:
            n = sock.recv_into(view[got:])
        except TimeoutError as e:
            raise NBDProtocolError(f"expected {len(view)} bytes of {what}, received {got} "
                                   f"before the {sock.gettimeout()} s timeout") from e
        except ConnectionError as e:
            raise NBDProtocolError(f"expected {len(view)} bytes of {what}, received {got} "
                                   f"before the connection failed ({e})") from e
        if n == 0:
            raise NBDProtocolError(f"expected {len(view)} bytes of {what}, received {got} "
                                   "before the server closed the connection")
        got += n


def _recv_exact(sock: socket.socket, length: int, what: str) -> bytes:
    buf = bytearray(length)
    _recv_into(sock, memoryview(buf), what)
    return bytes(buf)


def _send(sock: socket.socket, data: bytes | memoryview, what: str) -> None:
    """Send all of data; a dead or stalled peer is a protocol failure like a short read."""
    try:
        sock.sendall(data)
    except (TimeoutError, ConnectionError) as e:
        raise NBDProtocolError(f"expected the server to take {what}, but sending failed ({e})") from e


def _check_magic(what: str, expected: int, received: int) -> None:
    if received != expected:
        raise NBDProtocolError(f"bad {what}: expected {expected:#x}, received {received:#x}")


def handshake(sock: socket.socket, export_name: str = "") -> ExportInfo:
    """Negotiate export_name on a connected socket and leave it in the transmission phase.

    Fixed newstyle negotiation with a single NBD_OPT_GO carrying no information
    requests ("NBD_OPT_INFO and NBD_OPT_GO").  The caller owns the socket: set a
    timeout on it first, or a silent server blocks this call forever.  On a refused
    option a soft disconnect (NBD_OPT_ABORT) is sent before NBDOptionError is raised.
    """
    name = export_name.encode()
    if len(name) > MAX_EXPORT_NAME_BYTES or b"\0" in name:
        raise ValueError(f"export name {export_name!r}: must be at most {MAX_EXPORT_NAME_BYTES} "
                         "bytes of UTF-8 without NUL")

    magic, newstyle_magic, flags = _GREETING.unpack(_recv_exact(sock, _GREETING.size, "server greeting"))
    _check_magic("server greeting", NBDMAGIC, magic)
    if newstyle_magic == CLISERV_MAGIC:
        raise NBDProtocolError(f"expected a newstyle server (IHAVEOPT {IHAVEOPT:#x}), "
                               "received the oldstyle greeting, which is not supported")
    _check_magic("newstyle greeting", IHAVEOPT, newstyle_magic)
    if not flags & NBD_FLAG_FIXED_NEWSTYLE:
        raise NBDProtocolError("expected handshake flag NBD_FLAG_FIXED_NEWSTYLE, "
                               f"received flags {flags:#06x}")
    client_flags = NBD_FLAG_C_FIXED_NEWSTYLE
    if flags & NBD_FLAG_NO_ZEROES:
        client_flags |= NBD_FLAG_C_NO_ZEROES
    _send(sock, _U32.pack(client_flags), "client flags")

    data = _U32.pack(len(name)) + name + _U16.pack(0)  # no information requests
    _send(sock, _OPTION.pack(IHAVEOPT, NBD_OPT_GO, len(data)) + data, "NBD_OPT_GO")

    info = None
    while True:
        reply_type, payload = _recv_option_reply(sock, NBD_OPT_GO)
        if reply_type == NBD_REP_INFO:
            info = _parse_info(payload) or info
        elif reply_type == NBD_REP_ACK:
            if info is None:
                raise NBDProtocolError("expected NBD_REP_INFO with NBD_INFO_EXPORT before NBD_REP_ACK, "
                                       "received NBD_REP_ACK alone")
            return info
        elif reply_type & NBD_REP_FLAG_ERROR:
            _abort(sock)
            raise NBDOptionError(reply_type, "NBD_OPT_GO", f"export {export_name!r}",
                                 payload.decode(errors="replace"))
        else:
            raise NBDProtocolError("expected NBD_REP_INFO, NBD_REP_ACK or an error reply to NBD_OPT_GO, "
                                   f"received reply type {reply_type:#x}")


def _recv_option_reply(sock: socket.socket, option: int) -> tuple[int, bytes]:
    """One option reply ("Fixed newstyle negotiation"): its type and its payload."""
    magic, replied_option, reply_type, length = _OPTION_REPLY.unpack(
        _recv_exact(sock, _OPTION_REPLY.size, "option reply header"))
    _check_magic("option reply", OPTION_REPLY_MAGIC, magic)
    if replied_option != option:
        raise NBDProtocolError(f"expected a reply to option {option}, "
                               f"received one to option {replied_option}")
    if length > MAX_OPTION_REPLY_BYTES:
        raise NBDProtocolError(f"expected an option reply of at most {MAX_OPTION_REPLY_BYTES} bytes, "
                               f"received a length of {length}")
    return reply_type, _recv_exact(sock, length, "option reply data")


def _parse_info(payload: bytes) -> ExportInfo | None:
    """Parse an NBD_REP_INFO payload; information types other than NBD_INFO_EXPORT are ignored."""
    if len(payload) < _U16.size:
        raise NBDProtocolError(f"expected at least 2 bytes of NBD_REP_INFO, received {len(payload)}")
    (info_type,) = _U16.unpack_from(payload)
    if info_type != NBD_INFO_EXPORT:
        return None  # the protocol says to ignore information we did not ask for
    if len(payload) != _INFO_EXPORT.size:
        raise NBDProtocolError(f"expected {_INFO_EXPORT.size} bytes of NBD_INFO_EXPORT, "
                               f"received {len(payload)}")
    _, size_bytes, flags = _INFO_EXPORT.unpack(payload)
    if not flags & NBD_FLAG_HAS_FLAGS:
        raise NBDProtocolError(f"expected transmission flags with NBD_FLAG_HAS_FLAGS, received {flags:#06x}")
    return ExportInfo(size_bytes, flags)


def _abort(sock: socket.socket) -> None:
    """Soft disconnect during negotiation, as the protocol asks of a client that gives up."""
    try:
        sock.sendall(_OPTION.pack(IHAVEOPT, NBD_OPT_ABORT, 0))
    except OSError:
        pass  # the server is gone already; the caller closes the socket either way


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
            sock.sendall(_REQUEST.pack(NBD_REQUEST_MAGIC, 0, NBD_CMD_DISC, self._take_handle(), 0, 0))
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
        name = _COMMAND_NAMES[command]
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
            _send(sock, _REQUEST.pack(NBD_REQUEST_MAGIC, flags, command, handle, offset_bytes, length),
                  f"{name} request")
            if payload is not None:
                _send(sock, payload, f"{name} data")
            magic, error, reply_handle = _SIMPLE_REPLY.unpack(
                _recv_exact(sock, _SIMPLE_REPLY.size, f"{name} reply header"))
            if magic == NBD_STRUCTURED_REPLY_MAGIC:
                raise NBDProtocolError(f"expected a simple reply to {name}, received a structured reply, "
                                       "which was never negotiated")
            _check_magic(f"{name} reply", NBD_SIMPLE_REPLY_MAGIC, magic)
            if reply_handle != handle:
                raise NBDProtocolError(f"expected a reply to {name} handle {handle}, "
                                       f"received one for handle {reply_handle}")
            if not error and reply_into is not None:
                _recv_into(sock, reply_into, f"{name} data")
            return error
        except (OSError, NBDProtocolError):
            self._sock = None
            sock.close()
            raise
