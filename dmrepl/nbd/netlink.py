"""The kernel NBD client over generic netlink, with pyroute2 (no nbd-client binary).

Follows include/uapi/linux/nbd-netlink.h and drivers/block/nbd.c (nbd_genl_*):
a "nbd" generic netlink family, version 1, and a multicast group "nbd_mc_group"
on which the kernel announces NBD_CMD_LINK_DEAD when a socket dies while a
timeout is set.  Userspace negotiates each socket up to NBD_OPT_GO
(dmrepl.nbd.handshake) and hands the connected sockets over with
NBD_CMD_CONNECT; the kernel then speaks the transmission phase itself, simple
replies only.

Every request passes through `NBDNetlink._request`, the one choke point: it
fills the header, waits for the kernel's answer and turns a refusal into an
`NBDNetlinkError` that names the command and the device.
"""

from __future__ import annotations

import errno
import select
import socket
from dataclasses import dataclass
from enum import IntEnum, IntFlag
from typing import Sequence

from pyroute2.netlink import NLM_F_ACK, NLM_F_REQUEST, genlmsg, nla
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.generic import GenericNetlinkSocket

from dmrepl.kernel.errors import KernelError

FAMILY = "nbd"
VERSION = 1
MCAST_GROUP = "nbd_mc_group"


class Cmd(IntEnum):
    CONNECT = 1      # hand sockets over; the reply names the device index
    DISCONNECT = 2   # end the connection (the device stays, unconfigured)
    RECONFIGURE = 3  # give a configured device new sockets (after LINK_DEAD) or a new timeout
    LINK_DEAD = 4    # multicast from the kernel: a socket died
    STATUS = 5       # which devices exist and whether they are connected


class ClientFlag(IntFlag):
    DESTROY_ON_DISCONNECT = 1 << 0  # free the device's config when it disconnects
    DISCONNECT_ON_CLOSE = 1 << 1    # disconnect when the last opener closes the device


class nbdmsg(genlmsg):
    """One nbd generic netlink message (nbd-netlink.h: NBD_ATTR_*)."""

    prefix = "NBD_ATTR_"
    nla_map = (
        ("NBD_ATTR_UNSPEC", "none"),
        ("NBD_ATTR_INDEX", "uint32"),
        ("NBD_ATTR_SIZE_BYTES", "uint64"),
        ("NBD_ATTR_BLOCK_SIZE_BYTES", "uint64"),
        ("NBD_ATTR_TIMEOUT", "uint64"),            # seconds; 0 waits forever (DESIGN.md section 3)
        ("NBD_ATTR_SERVER_FLAGS", "uint64"),       # the export's transmission flags from NBD_OPT_GO
        ("NBD_ATTR_CLIENT_FLAGS", "uint64"),
        ("NBD_ATTR_SOCKETS", "sockets"),
        ("NBD_ATTR_DEAD_CONN_TIMEOUT", "uint64"),  # seconds the kernel waits for RECONFIGURE
        ("NBD_ATTR_DEVICE_LIST", "device_list"),
        ("NBD_ATTR_BACKEND_IDENTIFIER", "asciiz"),
    )

    class sockets(nla):
        nla_map = (("NBD_SOCK_ITEM_UNSPEC", "none"), ("NBD_SOCK_ITEM", "sock_item"))

        class sock_item(nla):
            nla_map = (("NBD_SOCK_UNSPEC", "none"), ("NBD_SOCK_FD", "uint32"))

    class device_list(nla):
        nla_map = (("NBD_DEVICE_ITEM_UNSPEC", "none"), ("NBD_DEVICE_ITEM", "device_item"))

        class device_item(nla):
            nla_map = (("NBD_DEVICE_UNSPEC", "none"), ("NBD_DEVICE_INDEX", "uint32"),
                       ("NBD_DEVICE_CONNECTED", "uint8"))


class NBDNetlinkError(KernelError):
    """An nbd netlink command refused by the kernel: errno, the command, the device."""


@dataclass(frozen=True)
class DeviceState:
    index: int
    connected: bool

    @property
    def path(self) -> str:
        return device_path(self.index)


@dataclass(frozen=True)
class LinkEvent:
    cmd: Cmd
    index: int


def device_path(index: int) -> str:
    return f"/dev/nbd{index}"


def _sockets_attr(socks: Sequence[socket.socket]) -> dict:
    return {"attrs": [("NBD_SOCK_ITEM", {"attrs": [("NBD_SOCK_FD", s.fileno())]}) for s in socks]}


class NBDNetlink:
    """A bound nbd generic netlink socket.  Use as a context manager, or call close()."""

    def __init__(self):
        self._sock = GenericNetlinkSocket()
        try:
            self._sock.bind(FAMILY, nbdmsg)
        except NetlinkError as e:
            self._sock.close()
            raise NBDNetlinkError(e.code, "genl bind", FAMILY,
                                  "the nbd module is not loaded (modprobe nbd)") from None
        except BaseException:
            self._sock.close()
            raise

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> "NBDNetlink":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- the one choke point --------------------------------------------------

    def _request(self, cmd: Cmd, attrs: list, index: int | None = None) -> list:
        msg = nbdmsg()
        msg["cmd"] = int(cmd)
        msg["version"] = VERSION
        if index is not None:
            attrs = [("NBD_ATTR_INDEX", index), *attrs]
        msg["attrs"] = attrs
        try:
            return list(self._sock.nlm_request(msg, msg_type=self._sock.prid,
                                               msg_flags=NLM_F_REQUEST | NLM_F_ACK))
        except NetlinkError as e:
            obj = device_path(index) if index is not None else None
            raise NBDNetlinkError(e.code, f"NBD_CMD_{cmd.name}", obj) from None

    # -- commands ---------------------------------------------------------------

    def connect(self, socks: Sequence[socket.socket], *, size_bytes: int, server_flags: int,
                block_size: int = 4096, timeout_s: int = 0, dead_conn_timeout_s: int = 0,
                index: int | None = None, client_flags: ClientFlag = ClientFlag(0),
                backend: str | None = None) -> int:
        """NBD_CMD_CONNECT: hand negotiated sockets to the kernel; returns the device index.

        The kernel takes its own reference to each socket (nbd.c: nbd_get_socket),
        so the caller may close its descriptors afterwards.  Several sockets need
        NBD_FLAG_CAN_MULTI_CONN in server_flags, or the kernel refuses them.
        """
        attrs: list = [("NBD_ATTR_SIZE_BYTES", size_bytes), ("NBD_ATTR_BLOCK_SIZE_BYTES", block_size),
                       ("NBD_ATTR_SERVER_FLAGS", server_flags), ("NBD_ATTR_TIMEOUT", timeout_s),
                       ("NBD_ATTR_CLIENT_FLAGS", int(client_flags)), ("NBD_ATTR_SOCKETS", _sockets_attr(socks))]
        if dead_conn_timeout_s:
            attrs.append(("NBD_ATTR_DEAD_CONN_TIMEOUT", dead_conn_timeout_s))
        if backend:
            attrs.append(("NBD_ATTR_BACKEND_IDENTIFIER", backend))
        reply = self._request(Cmd.CONNECT, attrs, index)
        for msg in reply:
            found = msg.get_attr("NBD_ATTR_INDEX")
            if found is not None:
                return int(found)
        raise NBDNetlinkError(errno.EPROTO, "NBD_CMD_CONNECT", None, "the kernel's reply names no device")

    def reconfigure(self, index: int, socks: Sequence[socket.socket] = (), *, timeout_s: int | None = None,
                    backend: str | None = None) -> None:
        """NBD_CMD_RECONFIGURE: replace dead sockets of a configured device (after LINK_DEAD).

        A device connected with a backend identifier must be reconfigured with the
        same one, or the kernel refuses with EINVAL (nbd.c: nbd_genl_reconfigure,
        "must specify backend").
        """
        attrs: list = []
        if backend:
            attrs.append(("NBD_ATTR_BACKEND_IDENTIFIER", backend))
        if timeout_s is not None:
            attrs.append(("NBD_ATTR_TIMEOUT", timeout_s))
        if socks:
            attrs.append(("NBD_ATTR_SOCKETS", _sockets_attr(socks)))
        self._request(Cmd.RECONFIGURE, attrs, index)

    def disconnect(self, index: int) -> None:
        """NBD_CMD_DISCONNECT: end the connection; pending I/O fails."""
        self._request(Cmd.DISCONNECT, [], index)

    def status(self, index: int | None = None) -> list[DeviceState]:
        """NBD_CMD_STATUS: every nbd device (or one) and whether it is connected."""
        out = []
        for msg in self._request(Cmd.STATUS, [], index):
            devices = msg.get_attr("NBD_ATTR_DEVICE_LIST")
            if devices is None:
                continue
            for item in devices.get_attrs("NBD_DEVICE_ITEM"):
                out.append(DeviceState(index=int(item.get_attr("NBD_DEVICE_INDEX")),
                                       connected=bool(item.get_attr("NBD_DEVICE_CONNECTED"))))
        return out


    def is_connected(self, index: int) -> bool:
        """False also once DESTROY_ON_DISCONNECT freed the device (STATUS then lists nothing)."""
        return any(d.connected for d in self.status(index))


class LinkEvents:
    """The nbd multicast group: LINK_DEAD (and other announcements) as they happen.

    Join *before* doing what may cause an event, so that none is missed.
    """

    def __init__(self):
        self._sock = GenericNetlinkSocket()
        try:
            self._sock.bind(FAMILY, nbdmsg)
            self._sock.add_membership(MCAST_GROUP)
        except BaseException:
            self._sock.close()
            raise

    def fileno(self) -> int:
        return self._sock.fileno()

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> "LinkEvents":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def wait(self, timeout: float | None) -> list[LinkEvent]:
        """Events that arrive within `timeout` seconds (all that are queued once one is)."""
        ready, _, _ = select.select([self._sock.fileno()], [], [], timeout)
        if not ready:
            return []
        events = []
        for msg in self._sock.get():
            try:
                cmd = Cmd(msg["cmd"])
            except ValueError:
                continue
            index = msg.get_attr("NBD_ATTR_INDEX")
            events.append(LinkEvent(cmd=cmd, index=int(index) if index is not None else -1))
        return events

