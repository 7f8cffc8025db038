"""The data link lets no one in (issue 11, point 1): the secondary's NBD gate serves only the
primary that proved the key on the control link, from the address it proved it from, with that
session's export name (kernel tier, e2e: hosts p and s, and an intruder x on the same link).
"""

from __future__ import annotations

import hashlib
import os
import socket
import time

import pytest
from daemons_lab import DISK, NAME, NBD_PORT, TOP, Capture, image

from dmrepl import poll
from dmrepl.kernel import blockdev
from dmrepl.nbd.client import NBDClient
from dmrepl.nbd.handshake import handshake
from dmrepl.nbd.protocol import NBDOptionError, NBDProtocolError

MiB = 1 << 20


def _disk_digest(path) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _closed_before_the_greeting(address: str) -> bool:
    with socket.create_connection(address, timeout=10) as sock:
        return sock.recv(64) == b""


def _export_name(hosts) -> str:
    """The name the gate serves now, from the cmdline of one of its nbdkit servers."""
    pids = (hosts.dir / "s-state" / NAME / "export.pid").read_text().split()
    assert pids, "the gate serves no connection"
    with open(f"/proc/{pids[0]}/cmdline", "rb") as f:
        args = f.read().split(b"\0")
    return next(a.split(b"=", 1)[1].decode() for a in args if a.startswith(b"exportname="))


def test_only_the_authenticated_primary_gets_in(hosts):
    x = hosts.lab.add_intruder()
    image(hosts.dir / "s.img", DISK, b"\x11")          # S = P: no initial copy
    hosts.start_secondary()
    hosts.start_primary("--assume-clean")
    s_addr = (hosts.s_addr, NBD_PORT)
    before = _disk_digest(hosts.dir / "s.img")
    first = _export_name(hosts)
    assert first.startswith("dmrepl-") and len(first) > 30 and "r5-id" not in first

    # The intruder, knowing the resource id or even this session's name: closed before a byte
    # of NBD, and the secondary's log names it.
    with hosts.lab.inside("x"):
        assert _closed_before_the_greeting(s_addr)
        for name in ("r5-id", first):
            with pytest.raises((NBDProtocolError, OSError)):
                NBDClient.connect(*s_addr, name, timeout=10)
    poll.wait_for(lambda: hosts.log("s").count(f"NBD connection from {x.address}:"), "the refusals in the log",
                  ok=lambda n: n >= 3, timeout=30)
    assert (f"refused: not the primary of the authenticated control session ({hosts.lab.hosts['p'].address})"
            in hosts.log("s"))

    # A new control session (the primary restarts) gets a new name; the old one is refused in
    # the handshake even from the primary's own address.
    r = hosts.cli("p", "down")
    assert r.returncode == 0, r.stderr
    hosts.procs["p"].wait(timeout=60)
    hosts.start_primary()
    second = _export_name(hosts)
    assert second != first
    with hosts.lab.inside("p"):
        sock = socket.create_connection(s_addr, timeout=10)
        try:
            with pytest.raises(NBDOptionError, match="not found|unknown"):
                handshake(sock, first)
        finally:
            sock.close()

    assert hosts.status()["state"] == "replicating"
    assert _disk_digest(hosts.dir / "s.img") == before      # nothing reached S

    # The plain link carries what is written in clear (the capture of the WireGuard test finds
    # none of it: test_tunnel.py): this is the control that the capture sees a write.
    pattern = os.urandom(4096)
    with Capture(hosts.lab, "p") as cap:
        blockdev.write_at(TOP, 3 * MiB, pattern)
        time.sleep(0.5)
    assert cap.shows(pattern) >= 4      # of 8: a piece across two TCP segments is not found whole
