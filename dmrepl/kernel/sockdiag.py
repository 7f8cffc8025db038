"""Abort one TCP connection by its addresses: sock_diag's SOCK_DESTROY (what `ss -K` does).

    destroy_tcp(("10.0.0.1", 45678), ("10.0.0.2", 10809))  ->  True, or False if no such connection

The kernel NBD client holds its sockets without any file descriptor in userspace; a daemon
that took over a dead daemon's NBD device can still cut those connections by their exact
four addresses (kept in the state directory at the attach), so that a disconnect does not
wait behind a sender that a silent peer blocked (docs/kernel-notes.md).  The kernel must have
CONFIG_INET_DIAG_DESTROY (Debian's has); the caller must be root (CAP_NET_ADMIN) and in the
connection's network namespace.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import struct

NETLINK_SOCK_DIAG = 4
SOCK_DESTROY = 21
NLM_F_REQUEST, NLM_F_ACK = 0x1, 0x4
NLMSG_ERROR = 2
INET_DIAG_NOCOOKIE = 0xFFFFFFFF


def _request(local: tuple[str, int], remote: tuple[str, int]) -> bytes:
    """nlmsghdr + inet_diag_req_v2 for the established connection local -> remote."""
    src, dst = ipaddress.ip_address(local[0]), ipaddress.ip_address(remote[0])
    if src.version != dst.version:
        raise ValueError(f"addresses of two families: {local[0]} and {remote[0]}")
    family = socket.AF_INET if src.version == 4 else socket.AF_INET6
    sockid = (struct.pack("!HH", local[1], remote[1]) + src.packed.ljust(16, b"\0") + dst.packed.ljust(16, b"\0")
              + struct.pack("=III", 0, INET_DIAG_NOCOOKIE, INET_DIAG_NOCOOKIE))
    req = struct.pack("=BBBxI", family, socket.IPPROTO_TCP, 0, 0xFFFFFFFF) + sockid
    return struct.pack("=IHHII", 16 + len(req), SOCK_DESTROY, NLM_F_REQUEST | NLM_F_ACK, 1, 0) + req


def destroy_tcp(local: tuple[str, int], remote: tuple[str, int]) -> bool:
    """Abort the TCP connection from `local` to `remote` (its blocked senders and receivers get
    ECONNABORTED); False when there is no such connection.  Raises OSError otherwise."""
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_SOCK_DIAG) as s:
        s.settimeout(5)
        s.send(_request(local, remote))
        reply = s.recv(4096)
    _len, kind = struct.unpack_from("=IH", reply)
    if kind != NLMSG_ERROR:
        raise OSError(errno.EPROTO, f"sock_diag answered message type {kind} to SOCK_DESTROY")
    err = -struct.unpack_from("=i", reply, 16)[0]
    if err == 0:
        return True
    if err == errno.ENOENT:
        return False
    raise OSError(err, f"SOCK_DESTROY {local[0]}:{local[1]} -> {remote[0]}:{remote[1]}: {os.strerror(err)}"
                  + (" (the kernel lacks CONFIG_INET_DIAG_DESTROY)" if err == errno.EOPNOTSUPP else ""))
