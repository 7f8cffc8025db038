"""The encrypted link option (issue 11, point 2): with [link] encrypt = "wireguard" the control
link and NBD run inside a WireGuard tunnel that both daemons make and remove; a tap on the wire
sees no written byte, a wrong key gets no connection (kernel tier, e2e: hosts p and s; one stack
for all of it, a VM boot's worth of daemon starts being the cost of this tier).
"""

from __future__ import annotations

import os
import re
import socket
import struct
import time

from daemons_lab import DISK, NAME, START_TIMEOUT, TOP, TUNNEL, WG_PORT, Capture, image
from pyroute2 import NetNS

from dmrepl import poll
from dmrepl.kernel import blockdev, loop, wireguard
from dmrepl.link import x25519

IFNAME = f"dmrepl-{NAME}"
MiB = 1 << 20


def _routes_via(lab, host: str) -> list[tuple[str, int]] | None:
    """(destination, prefix) of the main table's IPv4 and IPv6 routes through the tunnel; None:
    no interface."""
    with NetNS(lab.hosts[host].netns) as ns:
        found = ns.link_lookup(ifname=IFNAME)
        if not found:
            return None
        return sorted((r.get_attr("RTA_DST"), r["dst_len"]) for family in (socket.AF_INET, socket.AF_INET6)
                      for r in ns.get_routes(family=family, table=254) if r.get_attr("RTA_OIF") == found[0])


def _ip_frames(cap: Capture) -> list[tuple[int, int, int]]:
    """(IP protocol, source port, destination port) of the IPv4 frames captured."""
    out = []
    for f in cap.frames:
        if len(f) >= 38 and f[12:14] == b"\x08\x00":
            ihl = (f[14] & 15) * 4
            out.append((f[23], *struct.unpack(">HH", f[14 + ihl:18 + ihl])))
    return out


def test_the_link_runs_inside_wireguard_the_wire_shows_no_written_byte_and_a_wrong_key_gets_nothing(hosts):
    hosts.use_tunnel()
    image(hosts.dir / "s.img", DISK, b"\x11")          # S = P: no initial copy
    hosts.start_secondary()
    hosts.start_primary("--assume-clean")
    for h, other in (("p", "s"), ("s", "p")):
        assert _routes_via(hosts.lab, h) == [(TUNNEL[other], 32)], h    # the peer's address and nothing else

    pattern = os.urandom(4096)
    with Capture(hosts.lab, "p") as cap:
        blockdev.write_at(TOP, 3 * MiB, pattern)
        time.sleep(0.5)                                 # a few heartbeats too
    s_disk = loop.find(str(hosts.dir / "s.img"))[0]
    assert blockdev.read_at(s_disk, 3 * MiB, 4096) == pattern      # replicated, synchronously
    frames = _ip_frames(cap)
    assert sum(len(f) for f in cap.frames) > 4096, "the write did not cross the captured link"
    assert cap.shows(pattern) == 0
    assert frames and all(f == (17, WG_PORT, WG_PORT) for f in frames), sorted(set(frames))[:5]   # only WireGuard
    st = hosts.status()
    assert st["state"] == "replicating" and st["tunnel"]["interface"] == IFNAME
    assert st["tunnel"]["last_handshake_s"] is not None and st["tunnel"]["tx_bytes"] > 4096
    assert "tunnel  WireGuard dmrepl-r5: 10.99.0.1 <-> 10.99.0.2 via" in hosts.cli("p", "status").stdout
    assert f"WireGuard tunnel {IFNAME}: {TUNNEL['s']} <-> {TUNNEL['p']}" in hosts.log("s")

    r = hosts.cli("p", "down")
    assert r.returncode == 0, r.stderr
    hosts.procs["p"].wait(timeout=60)
    assert _routes_via(hosts.lab, "p") is None

    # p again, now expecting another public key of s than s holds: WireGuard answers nothing.
    config = (hosts.dir / "p.toml").read_text()
    theirs = re.search(r'peer_public_key = "([^"]+)"', config).group(1)
    stranger = x25519.encode(x25519.public(x25519.new_private()))
    (hosts.dir / "p.toml").write_text(config.replace(theirs, stranger))
    s_log_before = len(hosts.log("s"))
    with hosts.lab.inside("s"):
        rx_before = wireguard.peer_status(IFNAME).rx_bytes
    proc = hosts.start("p")     # it replicated before: it comes up degraded and keeps trying
    st = poll.wait_for(hosts.status, "p up without its secondary", timeout=START_TIMEOUT,
                       ok=lambda s: s is not None and s["state"] == "degraded")
    assert "the secondary's control link at 10.99.0.2:10810: timed out" in st["reason"], st["reason"]
    time.sleep(6)               # and one reconnect attempt (every 5 s)
    with hosts.lab.inside("s"):
        assert wireguard.peer_status(IFNAME).rx_bytes == rx_before  # not a byte got through
    # Nothing of this attempt reached the secondary's sockets: every connection that does is
    # logged as authenticated or refused (lines of the ended session may still come in).
    late = hosts.log("s")[s_log_before:]
    assert "authenticated" not in late and "refused" not in late, late

    r = hosts.cli("p", "down")
    assert r.returncode == 0, r.stderr
    proc.wait(timeout=60)
    assert _routes_via(hosts.lab, "p") is None
    r = hosts.cli("s", "down")
    assert r.returncode == 0, r.stderr
    assert _routes_via(hosts.lab, "s") is None
