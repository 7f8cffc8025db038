"""Failover, then failback without a full copy: the old primary follows the host that took over (e2e).

Both hosts have both roles' sections.  A (namespace p) replicates to B
(namespace s); after checkpoint 2, A writes W2 (it reaches B), the link is
cut, A writes W3 alone; B fails over (W2 rolled back to checkpoint 2) and its
consumer writes W4.  Then A gives its writes up (`resolve --discard-my-data`)
and comes back as B's secondary; B comes up as primary.  The resync must
compare only the union of A's writes since checkpoint 2, the chunks the
failover rolled back and B's writes since the takeover, copy exactly the
pieces that differ, and leave both disks equal to B's data byte for byte.
"""

from __future__ import annotations

import subprocess
import sys

from daemons_lab import ACTIVE, DISK, LINK_PORT, NAME, START_TIMEOUT, TOP, KiB, image

from dmrepl import poll
from dmrepl.daemon import control
from dmrepl.daemon.export import port_accepts
from dmrepl.kernel import blockdev
from dmrepl.state import StateStore

B4 = 4 * KiB


def _block(tag: str, i: int) -> bytes:
    return f"{tag}:{i}:".encode().ljust(B4, tag[-1].encode())


def _both_sections(hosts) -> None:
    """p.toml and s.toml get the other role's section: A's hidden stores, B's era metadata."""
    d, lab = hosts.dir, hosts.lab
    p_addr = lab.hosts["p"].address
    for name in ("ph0.img", "ph1.img"):
        image(d / name, DISK // 2, None)
    image(d / "s-era.img", 4 * (1 << 20), None)
    p = (d / "p.toml").read_text().replace(f'name = "{NAME}"\n', f'name = "{NAME}"\nstart_as = "primary"\n', 1)
    (d / "p.toml").write_text(
        p + f'[secondary]\ndisk = "{d}/p.img"\nhidden_stores = ["{d}/ph0.img", "{d}/ph1.img"]\n'
        f'listen = "{p_addr}:10809"\nlink_listen = "{p_addr}:{LINK_PORT}"\nkey_file = "{hosts.key}"\n')
    s = (d / "s.toml").read_text().replace(f'name = "{NAME}"\n', f'name = "{NAME}"\nstart_as = "secondary"\n', 1)
    (d / "s.toml").write_text(
        s + f'[primary]\ndisk = "{d}/s.img"\nera_metadata = "{d}/s-era.img"\nkey_file = "{hosts.key}"\n'
        f'era_block_kib = 64\ncheckpoint_interval_s = 0\nheartbeat_interval_s = 0.2\nnbd_connections = 2\n'
        f'nbd_timeout_s = {hosts.nbd_timeout_s}\nnetns = "{lab.hosts["s"].netns}"\n'
        f'[[primary.secondaries]]\nnbd = "{p_addr}:10809"\nlink = "{p_addr}:{LINK_PORT}"\n')


def _status(hosts, host: str) -> dict | None:
    try:
        return control.request(control.socket_path(str(hosts.dir / f"{host}-state" / NAME)), "status", timeout=10)
    except control.DaemonNotRunning:
        return None


def _ok(r: subprocess.CompletedProcess) -> str:
    assert r.returncode == 0, (r.stdout, r.stderr)
    return r.stdout


def test_failback_copies_only_the_union_and_both_disks_end_as_the_new_primarys(hosts):
    image(hosts.dir / "s.img", DISK, b"\x11")           # S equal to P: --assume-clean
    hosts.nbd_timeout_s = 5
    hosts.write_configs()
    _both_sections(hosts)
    hosts.start_secondary()
    hosts.start_primary("--assume-clean")
    for i in range(0, 8):
        blockdev.write_at(TOP, i * B4, _block("w1", i))
    _ok(hosts.cli("p", "checkpoint"))                        # checkpoint 2: W1 in both views
    for i in range(8, 16):
        blockdev.write_at(TOP, i * B4, _block("w2", i))      # reaches B; rolled back by its failover
    hosts.lab.link_down("s")
    poll.wait_for(hosts.status, "A to lose B", ok=lambda s: s and s["state"] == "degraded", timeout=60)
    for i in range(16, 24):
        blockdev.write_at(TOP, i * B4, _block("w3", i))      # A alone: given up at the failback

    # B takes over at checkpoint 2; its consumer writes W4.
    out = _ok(hosts.cli("s", "failover"))
    assert "merge complete" in out, out
    st = StateStore(str(hosts.dir / "s-state" / NAME)).load()
    assert st.role == "primary" and st.checkpoint == 2, st
    assert st.diverged["ranges"] == [[8 * B4, 8 * B4]], st.diverged     # exactly W2's chunks, rolled back
    checkpoint2 = b"".join(_block("w1", i) for i in range(8)) + b"\x11" * (DISK - 8 * B4)
    assert blockdev.read_at(ACTIVE, 0, DISK) == checkpoint2
    w4 = [4, 10, *range(24, 32)]
    for i in w4:
        blockdev.write_at(ACTIVE, i * B4, _block("w4", i))
    expected = bytearray(checkpoint2)
    for i in w4:
        expected[i * B4:(i + 1) * B4] = _block("w4", i)
    refused = hosts.cli("s", "up")
    assert refused.returncode == 1 and "took over on this host" in refused.stderr, refused.stderr

    # The swap: A down and resolved, B down; A up as secondary, B up as primary.
    _ok(hosts.cli("p", "down"))
    hosts.procs["p"].wait(timeout=60)
    hosts.lab.link_up("s")
    _ok(hosts.cli("s", "down"))
    refused = hosts.cli("p", "resolve")
    assert refused.returncode == 1 and "--discard-my-data" in refused.stderr, refused.stderr
    out = _ok(hosts.cli("p", "resolve", "--discard-my-data"))
    a = StateStore(str(hosts.dir / "p-state" / NAME)).load()
    assert a.role == "secondary" and a.checkpoint == 2, a
    assert a.diverged["ranges"] == [[0, 128 * KiB]], a.diverged   # W1..W3: era blocks 0 and 1 (64 KiB)
    p_addr = hosts.lab.hosts["p"].address
    log = open(f"{hosts.logs}/p-secondary.log", "ab")
    hosts.procs["p"] = hosts.lab.popen("p", [sys.executable, "-m", "dmrepl.cli", "up", NAME, "--config",
                                             hosts.config("p")], stdout=log, stderr=log)

    def listening():
        with hosts.lab.inside("p"):
            return port_accepts(p_addr, LINK_PORT)

    poll.wait_for(listening, "A's control link as secondary", timeout=START_TIMEOUT)
    log = open(f"{hosts.logs}/s-primary.log", "ab")
    hosts.procs["s"] = subprocess.Popen([sys.executable, "-m", "dmrepl.cli", "up", NAME, "--config",
                                         hosts.config("s")], stdout=log, stderr=log)
    s = poll.wait_for(lambda: _status(hosts, "s"), "B to replicate to A",
                      ok=lambda s: s and s["state"] == "replicating", timeout=START_TIMEOUT)
    r = s["last_resync"]
    assert r["phase"] == "copied", r
    assert r["candidate_bytes"] == 128 * KiB, r          # the union, not the disk (32 MiB)
    assert r["differing_bytes"] == 25 * B4, r            # W2, W3, W4 pieces; W1 was in both
    assert r["sent_bytes"] <= 1.05 * r["differing_bytes"], r
    assert blockdev.read_at(TOP, 0, DISK) == bytes(expected)
    with open(hosts.dir / "p.img", "rb") as f:
        assert f.read() == bytes(expected)
    _ok(hosts.cli("s", "checkpoint"))
    assert blockdev.read_at(ACTIVE, 0, DISK) == bytes(expected)    # A's standby view: B's data
    assert StateStore(str(hosts.dir / "p-state" / NAME)).load().diverged is None
    print(f"\nfailback: compared {r['candidate_bytes'] >> 10} KiB of {DISK >> 20} MiB, "
          f"{r['differing_bytes'] >> 10} KiB differed, sent {r['sent_bytes'] >> 10} KiB "
          f"({r['sent_bytes'] / r['differing_bytes']:.3f}x)")
    _ok(hosts.cli("s", "down"))
    _ok(hosts.cli("p", "down", "--force"))
