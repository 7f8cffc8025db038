"""Fixed newstyle negotiation up to NBD_OPT_GO, on a connected socket.

Separate from the transmission phase (client.py) because the kernel NBD path
reuses it: it negotiates in userspace and leaves the socket at the start of
the transmission phase, ready to be handed to the kernel.
"""

from __future__ import annotations

import socket

from dmrepl.nbd.protocol import (
    CLISERV_MAGIC,
    GREETING,
    IHAVEOPT,
    INFO_EXPORT,
    MAX_EXPORT_NAME_BYTES,
    MAX_OPTION_REPLY_BYTES,
    NBD_FLAG_C_FIXED_NEWSTYLE,
    NBD_FLAG_C_NO_ZEROES,
    NBD_FLAG_FIXED_NEWSTYLE,
    NBD_FLAG_HAS_FLAGS,
    NBD_FLAG_NO_ZEROES,
    NBD_INFO_EXPORT,
    NBD_OPT_ABORT,
    NBD_OPT_GO,
    NBD_REP_ACK,
    NBD_REP_FLAG_ERROR,
    NBD_REP_INFO,
    NBDMAGIC,
    OPTION,
    OPTION_REPLY,
    OPTION_REPLY_MAGIC,
    U16,
    U32,
    ExportInfo,
    NBDOptionError,
    NBDProtocolError,
)


def recv_into(sock: socket.socket, view: memoryview, what: str) -> None:
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


def recv_exact(sock: socket.socket, length: int, what: str) -> bytes:
    buf = bytearray(length)
    recv_into(sock, memoryview(buf), what)
    return bytes(buf)


def send(sock: socket.socket, data: bytes | memoryview, what: str) -> None:
    """Send all of data; a dead or stalled peer is a protocol failure like a short read."""
    try:
        sock.sendall(data)
    except (TimeoutError, ConnectionError) as e:
        raise NBDProtocolError(f"expected the server to take {what}, but sending failed ({e})") from e


def check_magic(what: str, expected: int, received: int) -> None:
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

    magic, newstyle_magic, flags = GREETING.unpack(recv_exact(sock, GREETING.size, "server greeting"))
    check_magic("server greeting", NBDMAGIC, magic)
    if newstyle_magic == CLISERV_MAGIC:
        raise NBDProtocolError(f"expected a newstyle server (IHAVEOPT {IHAVEOPT:#x}), "
                               "received the oldstyle greeting, which is not supported")
    check_magic("newstyle greeting", IHAVEOPT, newstyle_magic)
    if not flags & NBD_FLAG_FIXED_NEWSTYLE:
        raise NBDProtocolError("expected handshake flag NBD_FLAG_FIXED_NEWSTYLE, "
                               f"received flags {flags:#06x}")
    client_flags = NBD_FLAG_C_FIXED_NEWSTYLE
    if flags & NBD_FLAG_NO_ZEROES:
        client_flags |= NBD_FLAG_C_NO_ZEROES
    send(sock, U32.pack(client_flags), "client flags")

    data = U32.pack(len(name)) + name + U16.pack(0)  # no information requests
    send(sock, OPTION.pack(IHAVEOPT, NBD_OPT_GO, len(data)) + data, "NBD_OPT_GO")

    info = None
    while True:
        reply_type, payload = recv_option_reply(sock, NBD_OPT_GO)
        if reply_type == NBD_REP_INFO:
            info = parse_info(payload) or info
        elif reply_type == NBD_REP_ACK:
            if info is None:
                raise NBDProtocolError("expected NBD_REP_INFO with NBD_INFO_EXPORT before NBD_REP_ACK, "
                                       "received NBD_REP_ACK alone")
            return info
        elif reply_type & NBD_REP_FLAG_ERROR:
            abort(sock)
            raise NBDOptionError(reply_type, "NBD_OPT_GO", f"export {export_name!r}",
                                 payload.decode(errors="replace"))
        else:
            raise NBDProtocolError("expected NBD_REP_INFO, NBD_REP_ACK or an error reply to NBD_OPT_GO, "
                                   f"received reply type {reply_type:#x}")


def recv_option_reply(sock: socket.socket, option: int) -> tuple[int, bytes]:
    """One option reply ("Fixed newstyle negotiation"): its type and its payload."""
    magic, replied_option, reply_type, length = OPTION_REPLY.unpack(
        recv_exact(sock, OPTION_REPLY.size, "option reply header"))
    check_magic("option reply", OPTION_REPLY_MAGIC, magic)
    if replied_option != option:
        raise NBDProtocolError(f"expected a reply to option {option}, "
                               f"received one to option {replied_option}")
    if length > MAX_OPTION_REPLY_BYTES:
        raise NBDProtocolError(f"expected an option reply of at most {MAX_OPTION_REPLY_BYTES} bytes, "
                               f"received a length of {length}")
    return reply_type, recv_exact(sock, length, "option reply data")


def parse_info(payload: bytes) -> ExportInfo | None:
    """Parse an NBD_REP_INFO payload; information types other than NBD_INFO_EXPORT are ignored."""
    if len(payload) < U16.size:
        raise NBDProtocolError(f"expected at least 2 bytes of NBD_REP_INFO, received {len(payload)}")
    (info_type,) = U16.unpack_from(payload)
    if info_type != NBD_INFO_EXPORT:
        return None  # the protocol says to ignore information we did not ask for
    if len(payload) != INFO_EXPORT.size:
        raise NBDProtocolError(f"expected {INFO_EXPORT.size} bytes of NBD_INFO_EXPORT, "
                               f"received {len(payload)}")
    _, size_bytes, flags = INFO_EXPORT.unpack(payload)
    if not flags & NBD_FLAG_HAS_FLAGS:
        raise NBDProtocolError(f"expected transmission flags with NBD_FLAG_HAS_FLAGS, received {flags:#06x}")
    return ExportInfo(size_bytes, flags)


def abort(sock: socket.socket) -> None:
    """Soft disconnect during negotiation, as the protocol asks of a client that gives up."""
    try:
        sock.sendall(OPTION.pack(IHAVEOPT, NBD_OPT_ABORT, 0))
    except OSError:
        pass  # the server is gone already; the caller closes the socket either way
