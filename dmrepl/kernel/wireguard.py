"""A WireGuard interface for one resource's link (rtnetlink and the "wireguard" generic netlink
family, through pyroute2's IPRoute and WireGuard sockets).

    create(Interface(...))   ip link add NAME type wireguard; alias dmrepl:RESOURCE
                             wg set NAME private-key K listen-port L peer P endpoint E allowed-ips PEER/32
                             ip addr add ADDRESS peer PEER_ADDRESS dev NAME; ip link set NAME up
    remove(name, alias)      ip link del NAME -- only an interface with dmrepl's alias for that resource

The interface's only route is the point-to-point one to the peer's tunnel address, which the
kernel removes with the interface: nothing else is routed through it, and nothing is left after
it (drivers/net/wireguard/device.c: the device owns its peers and its UDP sockets).  Objects
are made in the calling thread's network namespace (the wireguard family is netnsok).
"""

from __future__ import annotations

import errno
import ipaddress
import time
from dataclasses import dataclass

from pyroute2 import IPRoute, WireGuard
from pyroute2.netlink.exceptions import NetlinkError

from dmrepl.kernel.errors import KernelError

ALIAS_PREFIX = "dmrepl:"


class WireGuardError(KernelError):
    """An rtnetlink or wireguard netlink request failed."""


@dataclass(frozen=True)
class Interface:
    name: str
    alias: str                      # dmrepl:RESOURCE: how dmrepl finds its own interfaces
    private_key: str                # base64, as the kernel's wg family takes it
    listen_port: int
    address: str                    # this host inside the tunnel
    peer_address: str
    peer_public_key: str            # base64
    peer_endpoint: tuple[str, int]  # the peer's UDP address outside the tunnel


@dataclass(frozen=True)
class PeerStatus:
    last_handshake_s: float | None  # seconds since the last handshake; None: never
    rx_bytes: int
    tx_bytes: int


def alias_of(resource: str) -> str:
    return ALIAS_PREFIX + resource


def _error(e: NetlinkError, call: str, obj: str, detail: str | None = None) -> WireGuardError:
    return WireGuardError(e.code or errno.EIO, call, obj, detail)


def _find(ipr: IPRoute, name: str):
    """The link message of interface `name`, or None."""
    found = ipr.link_lookup(ifname=name)
    return ipr.link("get", index=found[0])[0] if found else None


def create(spec: Interface) -> None:
    """Create and bring up the interface; on any failure what was made is removed again.
    An interface of that name must not exist (`remove` first): EEXIST otherwise."""
    host_bits = 32 if ipaddress.ip_address(spec.address).version == 4 else 128
    with IPRoute() as ipr:
        try:
            ipr.link("add", ifname=spec.name, kind="wireguard")
        except NetlinkError as e:
            detail = ("the kernel has no wireguard module (modprobe wireguard)" if e.code == errno.EOPNOTSUPP
                      else "an interface of that name exists" if e.code == errno.EEXIST else None)
            raise _error(e, "RTM_NEWLINK", spec.name, detail) from None
        call = "RTM_SETLINK"
        try:
            index = ipr.link_lookup(ifname=spec.name)[0]
            ipr.link("set", index=index, ifalias=spec.alias)
            _no_ipv6(spec.name)
            call = "WG_CMD_SET_DEVICE"
            with WireGuard() as wg:
                wg.set(spec.name, private_key=spec.private_key, listen_port=spec.listen_port,
                       peer={"public_key": spec.peer_public_key, "endpoint_addr": spec.peer_endpoint[0],
                             "endpoint_port": spec.peer_endpoint[1],
                             "allowed_ips": [f"{spec.peer_address}/{host_bits}"]})
            call = "RTM_NEWADDR"
            ipr.addr("add", index=index, local=spec.address, address=spec.peer_address, prefixlen=host_bits)
            call = "RTM_SETLINK"
            ipr.link("set", index=index, state="up")    # binds the UDP port: EADDRINUSE here
        except BaseException as e:
            try:
                ipr.link("del", ifname=spec.name)
            except NetlinkError:
                pass                # the error that matters is the first one
            if isinstance(e, NetlinkError):
                raise _error(e, call, spec.name) from None
            raise


def _no_ipv6(name: str) -> None:
    """No IPv6 on the tunnel: the kernel would give it a link-local address and an fe80::/64
    route (addrconf on an ARPHRD_NONE device), a route nobody asked for."""
    try:
        with open(f"/proc/sys/net/ipv6/conf/{name}/disable_ipv6", "w") as f:
            f.write("1")
    except FileNotFoundError:
        pass                        # a kernel without IPv6


def remove(name: str, alias: str) -> bool:
    """Delete interface `name` if it is dmrepl's for `alias`; False if there was none.  Another
    owner's interface of that name is refused (EBUSY), never removed."""
    with IPRoute() as ipr:
        link = _find(ipr, name)
        if link is None:
            return False
        found = link.get_attr("IFLA_IFALIAS") or ""
        if found != alias:
            raise WireGuardError(errno.EBUSY, "RTM_DELLINK", name,
                                 f"not dmrepl's interface for this resource (alias {found!r}, expected {alias!r})")
        try:
            ipr.link("del", index=link["index"])
        except NetlinkError as e:
            if e.code != errno.ENODEV:
                raise _error(e, "RTM_DELLINK", name) from None
        return True


def peer_status(name: str) -> PeerStatus | None:
    """The one peer's handshake age and byte counters; None without interface or peer."""
    try:
        with WireGuard() as wg:
            msgs = wg.info(name)
    except NetlinkError as e:
        if e.code in (errno.ENODEV, errno.ENOENT):
            return None
        raise _error(e, "WG_CMD_GET_DEVICE", name) from None
    for msg in msgs:
        for peer in msg.get_attr("WGDEVICE_A_PEERS") or []:
            shake = peer.get_attr("WGPEER_A_LAST_HANDSHAKE_TIME") or {}
            seconds = shake.get("tv_sec", 0) if isinstance(shake, dict) else 0
            return PeerStatus(last_handshake_s=time.time() - seconds if seconds else None,
                              rx_bytes=peer.get_attr("WGPEER_A_RX_BYTES") or 0,
                              tx_bytes=peer.get_attr("WGPEER_A_TX_BYTES") or 0)
    return None
