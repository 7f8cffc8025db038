"""The NBD protocol's constants, wire structures and errors (doc/proto.md of NetworkBlockDevice/nbd).

Only what dmrepl speaks: fixed newstyle negotiation up to NBD_OPT_GO, then
simple replies (the kernel NBD client understands no structured replies).
"""

from __future__ import annotations

import errno
import os
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
NBD_FLAG_CAN_MULTI_CONN = 1 << 8  # several connections see one consistent export

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
GREETING = struct.Struct("!QQH")        # NBDMAGIC, IHAVEOPT, handshake flags
OPTION = struct.Struct("!QII")          # IHAVEOPT, option, data length
OPTION_REPLY = struct.Struct("!QIII")   # magic, option, reply type, data length
U16 = struct.Struct("!H")
U32 = struct.Struct("!I")               # client flags; export name length
INFO_EXPORT = struct.Struct("!HQH")     # NBD_INFO_EXPORT, size in bytes, transmission flags
REQUEST = struct.Struct("!IHHQQI")      # magic, command flags, type, handle, offset, length
SIMPLE_REPLY = struct.Struct("!IIQ")    # magic, error, handle

# How an option error reads, and the nearest errno for callers that catch OSError.
REP_ERRORS: dict[int, tuple[str, str, int]] = {
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

COMMAND_NAMES = {
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
        self.reply_name, self.meaning, err = REP_ERRORS.get(reply, unknown)
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

    @property
    def can_multi_conn(self) -> bool:
        return bool(self.transmission_flags & NBD_FLAG_CAN_MULTI_CONN)
