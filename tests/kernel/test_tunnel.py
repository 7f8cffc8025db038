"""The encrypted link option (issue 11, point 2): with [link] encrypt = "wireguard" the control
link and NBD run inside a WireGuard tunnel that both daemons make and remove; a tap on the wire
sees no written byte, a wrong key gets no connection (kernel tier, e2e: hosts p and s).
"""

from __future__ import annotations

import os
import socket
import struct
import time

from daemons_lab import DISK, NAME, TOP, TUNNEL, WG_PORT, Capture, image
from pyroute2 import NetNS

from dmrepl.kernel import blockdev, loop, wireguard

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


def test_the_link_runs_inside_wireguard_and_the_wire_shows_no_written_byte(hosts):
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
    with hosts.lab.inside("s"):                         # an admin on host s
        r = hosts.cli("s", "status")
    assert f"tunnel  WireGuard {IFNAME}: {TUNNEL['s']} <-> {TUNNEL['p']} via" in r.stdout, (r.stdout, r.stderr)

    r = hosts.cli("p", "down")
    assert r.returncode == 0, r.stderr
    hosts.procs["p"].wait(timeout=60)
    r = hosts.cli("s", "down")
    assert r.returncode == 0, r.stderr
    assert _routes_via(hosts.lab, "p") is None and _routes_via(hosts.lab, "s") is None


def test_a_wrong_wireguard_key_gets_no_connection(hosts):
    hosts.use_tunnel(wrong_key_for_p=True)             # p expects another key of s than s holds
    hosts.start_secondary()
    proc = hosts.start("p")
    assert proc.wait(timeout=120) == 1
    log = hosts.log("p")
    assert "the secondary's control link at 10.99.0.2:10810: timed out" in log, log
    assert "silent peer is also one whose keys do not match" in log
    assert not os.path.exists(TOP)
    assert _routes_via(hosts.lab, "p") is None                     # the failed start removed its tunnel
    with hosts.lab.inside("s"):
        shake = wireguard.peer_status(IFNAME)
    assert shake is not None and shake.last_handshake_s is None and shake.rx_bytes == 0
    # Nothing from p reached the secondary's sockets: no refusal, no session, no NBD connection
    # (the test's own readiness probe connects from 10.99.0.2).
    assert f" {TUNNEL['p']}:" not in hosts.log("s")
