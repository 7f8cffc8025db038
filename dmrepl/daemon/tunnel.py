"""The resource's WireGuard tunnel ([link] encrypt = "wireguard"): made when the daemon starts,
before anything listens on or connects to the tunnel's addresses, and removed when it stops
(or by `dmrepl down` after a daemon that died).  Both the control link and NBD run inside it.
"""

from __future__ import annotations

import contextlib
import errno
from typing import TYPE_CHECKING, Callable

from dmrepl import private
from dmrepl.config import PrimaryConfig, SecondaryConfig
from dmrepl.errors import DmreplError
from dmrepl.link import x25519

if TYPE_CHECKING:
    from dmrepl.kernel import wireguard

Config = PrimaryConfig | SecondaryConfig


class TunnelError(DmreplError):
    pass


def _wireguard():
    """dmrepl.kernel.wireguard, imported when a tunnel is configured: it brings pyroute2, whose
    import costs a tenth of a second on a host and 3.5 s in the test VM (docs/kernel-notes.md),
    for every command and daemon start, most of which have no tunnel."""
    from dmrepl.kernel import wireguard
    return wireguard


def private_key(cfg: Config) -> bytes:
    """This host's WireGuard private key, from a file only root reads."""
    path = cfg.tunnel.private_key_file
    text = private.read_secret(path, "WireGuard key file", TunnelError,
                               missing=f"`dmrepl keygen {cfg.name} --wireguard` makes it and prints the public key "
                                       "to give the other host")
    try:
        return x25519.decode(text)
    except ValueError as e:
        raise TunnelError(f"WireGuard key file {path}: {e}",
                          f"make a new one with `dmrepl keygen {cfg.name} --wireguard`") from None


def interface(cfg: Config) -> wireguard.Interface:
    t, wireguard = cfg.tunnel, _wireguard()
    return wireguard.Interface(
        name=t.interface, alias=wireguard.alias_of(cfg.name), private_key=x25519.encode(private_key(cfg)),
        listen_port=t.listen_port, address=t.address, peer_address=t.peer_address,
        peer_public_key=t.peer_public_key, peer_endpoint=t.peer_endpoint)


def remove(cfg: Config) -> bool:
    """Remove the resource's interface if it is there, in this thread's network namespace."""
    if cfg.tunnel is None:
        return False
    wireguard = _wireguard()
    try:
        return wireguard.remove(cfg.tunnel.interface, wireguard.alias_of(cfg.name))
    except wireguard.WireGuardError as e:
        hint = (f"another program owns interface {cfg.tunnel.interface}: set link.interface to a name of "
                "dmrepl's own" if e.errno == errno.EBUSY else None)
        raise TunnelError(str(e), hint) from None


def remove_left(cfg: Config) -> list[str]:
    """`dmrepl down` after a daemon that died: its interface, in the link's namespace (the
    primary's `netns`), named in the list returned if there was one."""
    if cfg.tunnel is None:
        return []
    ns = getattr(cfg, "netns", None)
    if ns is not None:
        from pyroute2 import netns
        netns.pushns(ns)
    try:
        return [f"WireGuard interface {cfg.tunnel.interface}"] if remove(cfg) else []
    finally:
        if ns is not None:
            netns.popns()


@contextlib.contextmanager
def opened(cfg: Config, log: Callable[[str], None]):
    """The tunnel, up for as long as the block runs (nothing without [link] encrypt)."""
    if cfg.tunnel is None:
        yield None
        return
    wireguard, spec = _wireguard(), interface(cfg)
    if remove(cfg):
        log(f"WireGuard interface {spec.name} left by an earlier daemon: removed")
    try:
        wireguard.create(spec)
    except wireguard.WireGuardError as e:
        hint = {errno.EADDRINUSE: f"UDP port {spec.listen_port} is taken: change [link] listen_port (and the "
                                  "other host's peer_endpoint)",
                errno.EOPNOTSUPP: "`modprobe wireguard` (Linux 5.6 and later have it)"}.get(e.errno,
                                                                                       "check the [link] table")
        raise TunnelError(f"cannot make the WireGuard tunnel: {e}", hint) from None
    log(f"WireGuard tunnel {spec.name}: {spec.address} <-> {spec.peer_address} via "
        f"{spec.peer_endpoint[0]}:{spec.peer_endpoint[1]}, listening on UDP port {spec.listen_port}")
    try:
        yield spec
    finally:
        remove(cfg)
        log(f"WireGuard tunnel {spec.name} removed")


def status(cfg: Config) -> dict | None:
    """The tunnel as the kernel sees it now (from inside the link's namespace): None without one."""
    if cfg.tunnel is None:
        return None
    t = cfg.tunnel
    peer = _wireguard().peer_status(t.interface)
    return {"interface": t.interface, "address": t.address, "peer_address": t.peer_address,
            "peer_endpoint": f"{t.peer_endpoint[0]}:{t.peer_endpoint[1]}", "up": peer is not None,
            "last_handshake_s": None if peer is None or peer.last_handshake_s is None
            else round(peer.last_handshake_s, 1),
            "rx_bytes": peer.rx_bytes if peer else 0, "tx_bytes": peer.tx_bytes if peer else 0}
