"""The [link] table: the encrypted link option (issue 11, point 2).

    [link]
    encrypt = "wireguard"                   # "none" (the default): the link is plain TCP
    private_key_file = "/etc/dmrepl/vm1.wg" # this host's WireGuard key: `dmrepl keygen vm1 --wireguard`
    peer_public_key = "base64..."           # the other host's, as its keygen printed it
    address = "10.99.0.1"                   # this host inside the tunnel
    peer_address = "10.99.0.2"              # the other host inside the tunnel
    peer_endpoint = "192.168.1.2:51820"     # where the other host's WireGuard listens
    listen_port = 51820                     # where this host's WireGuard listens
    interface = "dmrepl-vm1"                # optional; default "dmrepl-NAME" (at most 15 bytes)

With a tunnel, every address the resource's link uses is inside it: the secondary's `listen` and
`link_listen` are on `address`, the primary's `nbd` and `link` on `peer_address`.  A config that
would send the link outside the tunnel is refused, not quietly encrypted in part.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass

from dmrepl.config.fields import ConfigError, check_keys, expect, number, parse_address
from dmrepl.link import x25519

DEFAULT_WG_PORT = 51820
IFNAMSIZ = 16        # include/uapi/linux/if.h, with the terminating NUL
ENCRYPTIONS = ("none", "wireguard")

KEYS = frozenset({"encrypt", "interface", "private_key_file", "peer_public_key", "address", "peer_address",
                  "peer_endpoint", "listen_port"})


@dataclass(frozen=True)
class Tunnel:
    interface: str
    private_key_file: str
    peer_public_key: str            # base64, checked to be 32 bytes
    address: str
    peer_address: str
    listen_port: int
    peer_endpoint: tuple[str, int]


def _ip(table: dict, key: str, where: str) -> str:
    value = expect(table, key, str, where, required=True)
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        raise ConfigError(f"{where}: '{key}' {value!r} is not an IP address (no prefix: the tunnel "
                          "routes exactly the other host's address)") from None


def _interface(table: dict, where: str, name: str) -> str:
    ifname = expect(table, "interface", str, where, f"dmrepl-{name}")
    if not 0 < len(ifname.encode()) < IFNAMSIZ or "/" in ifname or ifname.strip() != ifname or ":" in ifname:
        hint = ("set link.interface to a name of at most 15 bytes" if "interface" not in table
                else "use at most 15 bytes, no '/', ':' or spaces")
        raise ConfigError(f"{where}: interface name {ifname!r} is not a network interface name: {hint}")
    return ifname


def parse(doc: dict, source: str, name: str) -> Tunnel | None:
    """The tunnel [link] asks for, or None for a plain link."""
    where = f"{source} [link]"
    table = expect(doc, "link", dict, source, {})
    check_keys(table, KEYS, where)
    encrypt = expect(table, "encrypt", str, where, "none")
    if encrypt not in ENCRYPTIONS:
        raise ConfigError(f"{where}: 'encrypt' must be \"none\" or \"wireguard\", got {encrypt!r}")
    if encrypt == "none":
        extra = sorted(set(table) - {"encrypt"})
        if extra:
            raise ConfigError(f"{where}: {', '.join(extra)} only with encrypt = \"wireguard\"")
        return None
    peer_key = expect(table, "peer_public_key", str, where, required=True)
    try:
        x25519.decode(peer_key)
    except ValueError as e:
        raise ConfigError(f"{where}: 'peer_public_key': {e} (paste what `dmrepl keygen NAME --wireguard` "
                          "printed on the other host)") from None
    address, peer_address = _ip(table, "address", where), _ip(table, "peer_address", where)
    if address == peer_address:
        raise ConfigError(f"{where}: 'address' and 'peer_address' are both {address}")
    if ipaddress.ip_address(address).version != ipaddress.ip_address(peer_address).version:
        raise ConfigError(f"{where}: 'address' and 'peer_address' must both be IPv4 or both IPv6")
    listen_port = number(table, "listen_port", int, where, DEFAULT_WG_PORT, 1, 65535)
    endpoint = parse_address(expect(table, "peer_endpoint", str, where, required=True), where,
                             "peer_endpoint", DEFAULT_WG_PORT)
    if endpoint[0] in (address, peer_address):
        raise ConfigError(f"{where}: 'peer_endpoint' {endpoint[0]} is inside the tunnel: give the other "
                          "host's address on the network the tunnel crosses")
    key_file = expect(table, "private_key_file", str, where, required=True)
    return Tunnel(interface=_interface(table, where, name), private_key_file=os.path.abspath(key_file),
                  peer_public_key=peer_key.strip(), address=address, peer_address=peer_address,
                  listen_port=listen_port, peer_endpoint=endpoint)


def check_inside(tunnel: Tunnel | None, where: str, what: str, host: str, end: str) -> None:
    """`host` (one of the link's addresses) must be the tunnel's `end` ("address", this host's,
    or "peer_address")."""
    expected = getattr(tunnel, end, None)
    if tunnel is not None and host != expected:
        raise ConfigError(f"{where}: {what} {host} is outside the WireGuard tunnel of [link]: use {expected} "
                          "(the link runs inside the tunnel, or not at all)")
