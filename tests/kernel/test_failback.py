"""Failover, split brain, then failback without a full copy (kernel tier, e2e).

Host A (namespace p, resource name r5) replicates to host B (namespace s,
name r5b: the two "hosts" share one kernel, so their dm names must differ;
the resource id is the same).  Both have both roles' sections.  After
checkpoint 2, A writes W2 (it reaches B), the link is cut, A writes W3 alone;
B fails over (W2 rolled back to checkpoint 2) and its consumer writes W4.  B
comes up as primary while A still is: the link back, both see SPLIT BRAIN and
neither copies anything.  A gives its writes up (`resolve --discard-my-data`)
and comes back as B's secondary.  The resync must compare only the union of
A's writes since checkpoint 2, the chunks the failover rolled back and B's
writes since the takeover, copy exactly the pieces that differ, and leave both
disks equal to B's data byte for byte.
"""

from __future__ import annotations

import subprocess

from daemons_lab import (
    B_NAME,
    DISK,
    NAME,
    START_TIMEOUT,
    TOP,
    KiB,
    both_roles,
    cli_of,
    image,
    name_of,
    status_of,
    up_as,
)

from dmrepl import poll
from dmrepl.kernel import blockdev
from dmrepl.names import StackNames
from dmrepl.state import StateStore

B4 = 4 * KiB
A_ACTIVE = StackNames(NAME).mapper_path("active")
B_ACTIVE, B_TOP = StackNames(B_NAME).mapper_path("active"), StackNames(B_NAME).mapper_path_top()


def _block(tag: str, i: int) -> bytes:
    return f"{tag}:{i}:".encode().ljust(B4, tag[-1].encode())


def _ok(r: subprocess.CompletedProcess) -> str:
    assert r.returncode == 0, (r.stdout, r.stderr)
    return r.stdout


def _state(hosts, host: str):
    return StateStore(str(hosts.dir / f"{host}-state" / name_of(host))).load()


def test_split_brain_is_refused_then_failback_copies_only_the_union(hosts):
    try:
        _split_brain_then_failback(hosts)
    finally:
        cli_of(hosts, "s", "down", "--force")    # B's stack, whichever role (the fixture knows only A's name)


def _split_brain_then_failback(hosts):
    both_roles(hosts)
    image(hosts.dir / "s.img", DISK, b"\x11")           # S equal to P: --assume-clean
    up_as(hosts, "s", "secondary")
    up_as(hosts, "p", "primary", "--assume-clean")
    poll.wait_for(lambda: status_of(hosts, "p"), "A to replicate", ok=lambda s: s and s["state"] == "replicating",
                  timeout=START_TIMEOUT)
    for i in range(0, 8):
        blockdev.write_at(TOP, i * B4, _block("w1", i))
    _ok(cli_of(hosts, "p", "checkpoint"))                      # checkpoint 2: W1 in both views
    for i in range(8, 16):
        blockdev.write_at(TOP, i * B4, _block("w2", i))      # reaches B; rolled back by its failover
    hosts.lab.link_down("s")
    poll.wait_for(lambda: status_of(hosts, "p"), "A to lose B", ok=lambda s: s and s["state"] == "degraded",
                  timeout=60)
    for i in range(16, 24):
        blockdev.write_at(TOP, i * B4, _block("w3", i))      # A alone

    # B takes over at checkpoint 2; its consumer writes W4.
    assert "merge complete" in _ok(cli_of(hosts, "s", "failover"))
    st = _state(hosts, "s")
    assert st.role == "primary" and st.checkpoint == 2, st
    assert st.diverged["ranges"] == [[8 * B4, 8 * B4]], st.diverged     # exactly W2's chunks, rolled back
    checkpoint2 = b"".join(_block("w1", i) for i in range(8)) + b"\x11" * (DISK - 8 * B4)
    assert blockdev.read_at(B_ACTIVE, 0, DISK) == checkpoint2
    w4 = [4, 10, *range(24, 32)]
    for i in w4:
        blockdev.write_at(B_ACTIVE, i * B4, _block("w4", i))
    expected = bytearray(checkpoint2)
    for i in w4:
        expected[i * B4:(i + 1) * B4] = _block("w4", i)
    refused = cli_of(hosts, "s", "up")
    assert refused.returncode == 1 and "took over on this host" in refused.stderr, refused.stderr

    # Split brain: B up as primary while A still is; the link back.  Both see it, neither copies.
    _ok(cli_of(hosts, "s", "down"))
    up_as(hosts, "s", "primary")
    poll.wait_for(lambda: status_of(hosts, "s"), "B up as primary", ok=lambda s: s and s["state"] == "degraded",
                  timeout=START_TIMEOUT)
    hosts.lab.link_up("s")
    for host in ("p", "s"):
        s = poll.wait_for(lambda h=host: status_of(hosts, h), f"{host} to see the split brain",
                          ok=lambda s: s and s.get("split_brain"), timeout=60)
        assert s["state"] == "degraded" and "SPLIT BRAIN" in s["split_brain"], s
        assert "resolve" in s["split_brain"], s
    assert blockdev.read_at(B_TOP, 0, DISK) == bytes(expected)
    assert blockdev.read_at(TOP, 16 * B4, B4) == _block("w3", 16)
    assert "SPLIT BRAIN" in _ok(cli_of(hosts, "p", "status"))

    # A gives its writes up and follows B.
    refused = cli_of(hosts, "p", "resolve")
    assert refused.returncode == 1 and "--discard-my-data" in refused.stderr, refused.stderr
    refused = cli_of(hosts, "p", "resolve", "--discard-my-data")
    assert refused.returncode == 1 and "is up on this host" in refused.stderr, refused.stderr
    _ok(cli_of(hosts, "p", "down"))
    hosts.procs["p"].wait(timeout=60)
    _ok(cli_of(hosts, "p", "resolve", "--discard-my-data"))
    a = _state(hosts, "p")
    assert a.role == "secondary" and a.checkpoint == 2, a
    assert a.diverged["ranges"] == [[0, 128 * KiB]], a.diverged   # W1..W3: era blocks 0 and 1 (64 KiB)
    up_as(hosts, "p", "secondary")
    s = poll.wait_for(lambda: status_of(hosts, "s"), "B to resync A and replicate",
                      ok=lambda s: s and s["state"] == "replicating", timeout=START_TIMEOUT)
    assert s["split_brain"] is None, s
    r = s["last_resync"]
    assert r["phase"] == "copied", r
    assert r["candidate_bytes"] == 128 * KiB, r          # the union, not the disk (32 MiB)
    assert r["differing_bytes"] == 25 * B4, r            # W2, W3, W4 pieces; W1 was in both
    assert r["sent_bytes"] <= 1.05 * r["differing_bytes"], r
    assert blockdev.read_at(B_TOP, 0, DISK) == bytes(expected)
    with open(hosts.dir / "p.img", "rb") as f:
        assert f.read() == bytes(expected)
    _ok(cli_of(hosts, "s", "checkpoint"))
    assert blockdev.read_at(A_ACTIVE, 0, DISK) == bytes(expected)    # A's standby view: B's data
    assert _state(hosts, "p").diverged is None and _state(hosts, "s").diverged is None
    print(f"\nfailback: compared {r['candidate_bytes'] >> 10} KiB of {DISK >> 20} MiB, "
          f"{r['differing_bytes'] >> 10} KiB differed, sent {r['sent_bytes'] >> 10} KiB "
          f"({r['sent_bytes'] / r['differing_bytes']:.3f}x)")
    _ok(cli_of(hosts, "s", "down"))
    _ok(cli_of(hosts, "p", "down", "--force"))

