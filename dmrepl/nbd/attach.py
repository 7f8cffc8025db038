"""Attach a remote export as /dev/nbdN: negotiate in userspace, hand the sockets to the kernel.

    attach(host, port, export_name, expected_size_bytes=S, connections=4, timeout_s=2)

Each connection is negotiated to NBD_OPT_GO (dmrepl.nbd.handshake), checked
against what the caller expects (size, writable, flush and FUA, multi-conn for
more than one connection), then all of them go to the kernel in one
NBD_CMD_CONNECT.  A refused connection, a wrong export name, a size mismatch
and a protocol violation are each one clear error, and nothing is left behind.
"""

from __future__ import annotations

import errno
import glob
import os
import socket
from dataclasses import dataclass, field

from dmrepl.kernel.sockdiag import destroy_tcp
from dmrepl.nbd import netlink
from dmrepl.nbd.handshake import handshake
from dmrepl.nbd.protocol import ExportInfo, NBDOptionError, NBDProtocolError

# /sys/block/nbdN/backend of every device dmrepl attached: how it finds its own (and only its own).
BACKEND_PREFIX = "dmrepl:"


def ours() -> dict[int, str]:
    """{index: backend} of the connected nbd devices that dmrepl attached."""
    out = {}
    for path in glob.glob("/sys/block/nbd*/backend"):
        try:
            with open(path) as f:
                backend = f.read().strip()
        except OSError:
            continue
        if backend.startswith(BACKEND_PREFIX):
            out[int(os.path.basename(os.path.dirname(path))[3:])] = backend
    return out


class AttachError(OSError):
    """The export could not be attached; the message says why and what to check."""

    def __init__(self, err: int, message: str):
        super().__init__(err, message)
        self.message = message

    def __str__(self) -> str:
        return self.message


@dataclass(frozen=True)
class Attached:
    index: int
    info: ExportInfo
    connections: int
    # This process's own references to the sockets the kernel took (attach(keep_sockets=True)),
    # for cut(): empty otherwise.
    sockets: tuple[socket.socket, ...] = field(default=(), compare=False, repr=False)
    # (local address, local port, remote address, remote port) of each connection: enough to
    # abort them later from any process (abort()), e.g. a daemon taking over this device.
    endpoints: tuple[tuple[str, int, str, int], ...] = field(default=(), compare=False)

    @property
    def path(self) -> str:
        return netlink.device_path(self.index)


def negotiate(host: str, port: int, export_name: str, *, timeout_s: float) -> tuple[socket.socket, ExportInfo]:
    """One TCP connection negotiated to the transmission phase."""
    where = f"{host}:{port}"
    try:
        sock = socket.create_connection((host, port), timeout=timeout_s)
    except ConnectionRefusedError:
        raise AttachError(errno.ECONNREFUSED, f"NBD export at {where}: connection refused "
                          "(is the secondary up and its export listening?)") from None
    except OSError as e:
        raise AttachError(e.errno or errno.EIO, f"NBD export at {where}: cannot connect: "
                          f"{e.strerror or e}") from None
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        info = handshake(sock, export_name)
    except NBDOptionError as e:
        sock.close()
        raise AttachError(e.errno or errno.EINVAL, f"NBD export at {where} refused export name "
                          f"{export_name!r}: {e} (do both hosts use the same resource id?)") from None
    except NBDProtocolError as e:
        sock.close()
        raise AttachError(errno.EPROTO, f"NBD export at {where} broke the protocol: {e}") from None
    except OSError as e:
        sock.close()
        raise AttachError(e.errno or errno.EIO, f"NBD export at {where}: handshake failed: {e}") from None
    except BaseException:
        sock.close()
        raise
    # The kernel owns the socket from now on and expects it blocking.
    sock.settimeout(None)
    return sock, info


def attach(nl: netlink.NBDNetlink, host: str, port: int, export_name: str, *,
           expected_size_bytes: int | None = None, connections: int = 1, timeout_s: int = 2,
           dead_conn_timeout_s: int = 0, block_size: int = 4096, index: int | None = None,
           keep_sockets: bool = False) -> Attached:
    """Negotiate `connections` sockets and attach them as one nbd device; returns it.  With
    `keep_sockets` the returned device keeps this process's references to its sockets, which
    cut() needs (and closes)."""
    if connections < 1:
        raise ValueError(f"connections must be at least 1, got {connections}")
    socks: list[socket.socket] = []
    try:
        info = None
        for _ in range(connections):
            sock, got = negotiate(host, port, export_name, timeout_s=max(timeout_s, 1) * 5)
            socks.append(sock)
            if info is not None and got != info:
                raise AttachError(errno.EPROTO, f"NBD export at {host}:{port}: two connections saw different "
                                  f"exports ({info} and {got})")
            info = got
        assert info is not None
        if expected_size_bytes is not None and info.size_bytes != expected_size_bytes:
            raise AttachError(errno.EINVAL, f"NBD export at {host}:{port} is {info.size_bytes} bytes, this host's "
                              f"disk is {expected_size_bytes}: the two disks must be of one size")
        if info.read_only:
            raise AttachError(errno.EROFS, f"NBD export at {host}:{port} is read-only")
        if not (info.can_flush and info.can_fua):
            raise AttachError(errno.EOPNOTSUPP, f"NBD export at {host}:{port} cannot flush or FUA: "
                              "a write acknowledged there might not be durable")
        if connections > 1 and not info.can_multi_conn:
            raise AttachError(errno.EOPNOTSUPP, f"NBD export at {host}:{port} does not advertise multi-conn: "
                              "use one connection")
        endpoints = tuple((*s.getsockname()[:2], *s.getpeername()[:2]) for s in socks)
        dev = nl.connect(socks, size_bytes=info.size_bytes, server_flags=info.transmission_flags,
                         block_size=block_size, timeout_s=timeout_s, dead_conn_timeout_s=dead_conn_timeout_s,
                         index=index, client_flags=netlink.ClientFlag.DESTROY_ON_DISCONNECT,
                         backend=f"{BACKEND_PREFIX}{export_name}")
        attached = Attached(index=dev, info=info, connections=connections, sockets=tuple(socks) if keep_sockets else (),
                            endpoints=endpoints)
        if keep_sockets:
            socks = []
        return attached
    finally:
        for s in socks:
            s.close()  # the kernel holds its own references to the sockets it took


def cut(attached: Attached) -> None:
    """Shut down the device's sockets (both directions) and close this process's references.

    Call it before NBD_CMD_DISCONNECT when the peer is lost: the kernel's disconnect sends
    NBD_CMD_DISC on each socket under that socket's transmit lock, and a sender holding the lock
    while blocked on a full send buffer (a peer that acknowledges nothing: 100% packet loss)
    keeps it until its request is given up: 7-16 s with a 4 s NBD timeout and two connections
    (docs/kernel-notes.md).  A shutdown wakes such a sender at once with EPIPE; the disconnect
    then fails every request still in flight.  Without kept sockets this does nothing.
    """
    for s in attached.sockets:
        try:
            s.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass    # already shut down or reset: nothing left to wake
        s.close()


def abort(endpoints) -> int:
    """Abort the connections of `endpoints` (Attached.endpoints) through sock_diag, for a process
    without references to them; returns how many were still there.  Each is tried; an OSError
    (no CONFIG_INET_DIAG_DESTROY, not root) is raised after the others were."""
    done, failed = 0, None
    for la, lp, ra, rp in endpoints:
        try:
            done += destroy_tcp((la, lp), (ra, rp))
        except OSError as e:
            failed = e
    if failed is not None:
        raise failed
    return done


def reconnect(nl: netlink.NBDNetlink, index: int, host: str, port: int, export_name: str, *,
              expected_size_bytes: int, timeout_s: int = 2) -> ExportInfo:
    """Give an attached device whose link died a new connection (NBD_CMD_RECONFIGURE)."""
    sock, info = negotiate(host, port, export_name, timeout_s=max(timeout_s, 1) * 5)
    try:
        if info.size_bytes != expected_size_bytes:
            raise AttachError(errno.EINVAL, f"NBD export at {host}:{port} came back with {info.size_bytes} bytes, "
                              f"it had {expected_size_bytes}")
        nl.reconfigure(index, [sock], backend=f"{BACKEND_PREFIX}{export_name}")
    finally:
        sock.close()
    return info
