"""Losing the secondary and getting it back: bounded stalls, degraded state, delta resync (kernel tier, e2e).

Every test writes through the primary's device with a writer whose every write
has a hard deadline: a write that misses it fails the test (a write hung in D
state would otherwise hang the test).  After the resync, P and S are compared
byte for byte and the bytes the resync sent are checked against the bytes that
changed.
"""

from __future__ import annotations

import json
import os
import re
import signal
import time

from daemons_lab import ACTIVE, DISK, TOP, MiB, Writer, image

from dmrepl import poll
from dmrepl.kernel import blockdev

KiB = 1024


def _wait(hosts, writer: Writer, what: str, ok, timeout: float = 120):
    def probe():
        writer.check_deadline()
        return hosts.status()
    return poll.wait_for(probe, what, ok=ok, timeout=timeout)


def _file(path, offset=0, n=DISK) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(n)


def _equal_disks(hosts) -> None:
    image(hosts.dir / "s.img", DISK, b"\x11")   # S as the initial sync would leave it


def test_secondary_killed_then_back_copies_only_what_changed(hosts):
    _equal_disks(hosts)
    hosts.start_secondary()
    hosts.start_primary("--assume-clean")
    hot = [b for b in range(0, DISK // (4 * KiB), 97)]          # scattered 4 KiB blocks, 84 of them
    with Writer(hot) as w:
        time.sleep(1)
        t_kill = time.monotonic()
        os.kill(hosts.procs["s"].pid, signal.SIGKILL)            # the secondary's daemon dies (kill -9)
        s = _wait(hosts, w, "the primary to drop the secondary",
                  ok=lambda s: s["state"] == "degraded" and s["nbd_leg"] == "dropped")
        noticed = time.monotonic() - t_kill
        assert s["nbd"] is None and any(w in s["reason"] for w in ("control link", "leg", "NBD")), s
        time.sleep(1)
        assert w.stall_after(t_kill) < 5.0, w.stall_after(t_kill)
        # While degraded: 1 MiB written at 8 MiB, beside the writer's scattered blocks.
        blockdev.write_at(TOP, 8 * MiB, os.urandom(MiB))
        changed = set(w.last) | {b for b in range(8 * MiB // (4 * KiB), 9 * MiB // (4 * KiB))}
        hosts.procs["s"].wait()
        waited = hosts.cli("p", "wait", "--timeout", "1")        # a script waiting while the secondary is away
        assert waited.returncode == 1 and "r5 is not replicating after 1 s: degraded (" in waited.stderr, waited
        hosts.start_secondary()                                   # back; the writer goes on meanwhile
        waited = hosts.cli("p", "wait", "--json", "--timeout", "300", timeout=320)
        assert waited.returncode == 0 and json.loads(waited.stdout)["state"] == "replicating", waited
        s = _wait(hosts, w, "the resync to finish", ok=lambda s: s["state"] == "replicating", timeout=300)
    r = s["last_resync"]
    # Only blocks written since the common checkpoint were candidates; those that differ were copied.
    assert r["phase"] == "copied", r
    assert r["differing_bytes"] <= len(changed | set(w.last)) * 4 * KiB, (r, len(changed))
    assert r["differing_bytes"] >= MiB, r
    assert r["sent_bytes"] <= 1.05 * r["differing_bytes"], r
    p = _file(hosts.dir / "p.img")
    assert p == _file(hosts.dir / "s.img")
    assert "last resync: copied, written since checkpoint 1" in hosts.cli("p", "status").stdout
    assert hosts.cli("p", "checkpoint").returncode == 0   # the writer has stopped: S's view becomes P
    assert blockdev.read_at(ACTIVE, 0, DISK) == p
    for blk, data in w.last.items():                     # every block holds its last write
        assert p[blk * 4 * KiB:(blk + 1) * 4 * KiB] == data, blk
    print(f"\nkill -9 of the secondary's daemon: noticed in {noticed:.2f} s, longest write {w.stall_after(t_kill):.2f} s;"
          f" resync compared {r['candidate_bytes'] >> 10} KiB, {r['differing_bytes'] >> 10} KiB differed,"
          f" sent {r['sent_bytes'] >> 10} KiB ({r['sent_bytes'] / r['differing_bytes']:.3f}x)")


def test_a_cut_link_degrades_within_the_bound_and_heals_with_a_delta(hosts):
    hosts.nbd_timeout_s = 2
    hosts.write_configs(primary="reconnect_interval_s = 1\n")
    _equal_disks(hosts)
    hosts.start_secondary()
    hosts.start_primary("--assume-clean")
    with Writer([b for b in range(0, DISK // (4 * KiB), 31)]) as w:
        time.sleep(1)
        t_cut = time.monotonic()
        hosts.lab.link_down("s")
        s = _wait(hosts, w, "the primary to degrade", ok=lambda s: s["state"] == "degraded", timeout=30)
        noticed = time.monotonic() - t_cut
        # The secondary notices too: no frame for the primary's heartbeat timeout.
        peer = poll.wait_for(lambda: _secondary_peer(hosts), "the secondary to report the primary lost",
                             ok=lambda p: p and p["primary"] == "lost", timeout=30)
        assert "heartbeat timeout" in peer["reason"] or "ended" in peer["reason"], peer
        time.sleep(2)
        stall = w.stall_after(t_cut)
        hosts.lab.link_up("s")
        s = _wait(hosts, w, "the resync to finish", ok=lambda s: s["state"] == "replicating", timeout=300)
    assert noticed < 5.0 and stall < 5.0, (noticed, stall)
    assert "PRIMARY LOST" in hosts.log("s")
    r = s["last_resync"]
    changed = w.changed_bytes()         # every block the writer wrote since the start's checkpoint
    assert r["sent_bytes"] <= 1.05 * changed, (r, changed)
    p = _file(hosts.dir / "p.img")
    assert p == _file(hosts.dir / "s.img")
    assert hosts.cli("p", "checkpoint").returncode == 0
    assert blockdev.read_at(ACTIVE, 0, DISK) == p
    print(f"\nlink down: noticed in {noticed:.2f} s, longest write {stall:.2f} s; resync {changed >> 10} KiB "
          f"changed, {r['differing_bytes'] >> 10} KiB differed, sent {r['sent_bytes'] >> 10} KiB "
          f"({r['sent_bytes'] / changed:.3f}x the changed bytes)")


def _secondary_peer(hosts) -> dict | None:
    import json
    r = hosts.cli("s", "status", "--json")
    return json.loads(r.stdout).get("primary") if r.returncode == 0 else None


def test_nbdkit_killed_packet_loss_and_power_loss_each_heal_with_a_delta(hosts):
    hosts.write_configs(primary="reconnect_interval_s = 1\n")
    _equal_disks(hosts)
    hosts.start_secondary()
    hosts.start_primary("--assume-clean")
    figures = []

    def nbdkit_killed():
        pid = int((hosts.dir / "s-state" / "r5" / "export.pid").read_text().split()[0])   # one of the gate's servers
        os.kill(pid, signal.SIGKILL)               # the daemon restarts it; the primary's connections die

    def loss_100():
        hosts.lab.loss("s", 100)

    def loss_over():
        hosts.lab.loss("s", 0)

    def power_loss():
        os.kill(hosts.procs["s"].pid, signal.SIGKILL)
        hosts.procs["s"].wait()
        assert hosts.cli("s", "down", "--force").returncode == 0   # its devices vanish, its disks stay

    def power_back():
        hosts.start_secondary()

    for what, fault, repair in (("nbdkit killed", nbdkit_killed, None), ("100% packet loss", loss_100, loss_over),
                                ("power loss", power_loss, power_back)):
        done_before = _resyncs(hosts.status())
        with Writer([b for b in range(0, DISK // (4 * KiB), 53)]) as w:
            time.sleep(0.5)
            t = time.monotonic()
            fault()
            t_done = time.monotonic()           # a power loss takes its time (the devices' removal)
            _wait(hosts, w, f"the primary to degrade ({what})", timeout=60,
                  ok=lambda s: s["state"] == "degraded" or _resyncs(s) > done_before)
            noticed = time.monotonic() - t_done
            blockdev.write_at(TOP, 12 * MiB, os.urandom(256 * KiB))   # written while degraded
            time.sleep(1.5)
            stall = w.stall_after(t)
            if repair:
                repair()
            s = _wait(hosts, w, f"the resync after {what}", timeout=300,
                      ok=lambda s: s["state"] == "replicating" and _resyncs(s) > done_before)
        r = s["last_resync"]
        # Changed since the last checkpoint (the previous resync's, before this writer started):
        # the writer's blocks and the 256 KiB written while degraded.
        degraded = range(12 * MiB // (4 * KiB), (12 * MiB + 256 * KiB) // (4 * KiB))
        changed = len(w.changed_blocks() | set(degraded)) * 4 * KiB
        assert noticed < 5.0 and stall < 5.0, (what, noticed, stall)
        assert r["sent_bytes"] <= 1.05 * changed, (what, r, changed)
        assert _file(hosts.dir / "p.img") == _file(hosts.dir / "s.img"), what
        figures.append(f"{what}: noticed {noticed:.2f} s, longest write {stall:.2f} s, {changed >> 10} KiB changed, "
                       f"{r['differing_bytes'] >> 10} KiB differed, sent {r['sent_bytes'] >> 10} KiB "
                       f"({r['sent_bytes'] / changed:.3f}x the changed bytes)")
    assert hosts.cli("p", "checkpoint").returncode == 0
    assert blockdev.read_at(ACTIVE, 0, DISK) == _file(hosts.dir / "p.img")
    print("\n" + "\n".join(figures))


def test_a_primary_restarted_without_its_secondary_comes_up_degraded_then_resyncs(hosts):
    hosts.write_configs(primary="reconnect_interval_s = 1\n")
    _equal_disks(hosts)
    hosts.start_secondary()
    hosts.start_primary("--assume-clean")
    assert hosts.cli("s", "down", "--force").returncode == 0
    hosts.procs["s"].wait(timeout=60)
    poll.wait_for(hosts.status, "the primary to degrade", ok=lambda s: s["state"] == "degraded", timeout=60)
    assert hosts.cli("p", "down").returncode == 0
    hosts.procs["p"].wait(timeout=60)
    hosts.start("p")                                           # no secondary: up degraded, at once
    s = poll.wait_for(hosts.status, "the primary to come up degraded", timeout=120,
                      ok=lambda s: s is not None and s["state"] == "degraded")
    assert "not reachable" in s["reason"] and s["nbd_leg"] == "dropped", s
    blockdev.write_at(TOP, 3 * MiB, b"\x66" * (64 * KiB))      # the consumer works meanwhile
    hosts.start_secondary()
    s = poll.wait_for(hosts.status, "the resync", timeout=300, ok=lambda s: s["state"] == "replicating")
    r = s["last_resync"]
    assert r["differing_bytes"] == 64 * KiB and r["copy_bytes"] == 64 * KiB, r
    assert _file(hosts.dir / "p.img") == _file(hosts.dir / "s.img")


def _resyncs(s: dict) -> int:
    return sum(1 for h in s["history"] if h["event"] == "resynced")


def test_the_primary_daemon_killed_under_load_is_taken_over_by_the_next_one(hosts):
    """kill -9 of the primary's daemon: the kernel keeps the consumer's writes flowing (mirror, era,
    NBD need no daemon); the next `dmrepl up` takes the stack over as it is, disconnects the orphan
    NBD device and resyncs the delta, while the consumer writes on."""
    hosts.write_configs(primary="reconnect_interval_s = 0.5\n")
    _equal_disks(hosts)
    hosts.start_secondary()
    hosts.start_primary("--assume-clean")
    old_nbd = hosts.status()["nbd"]
    hot = list(range(0, DISK // (4 * KiB), 61))
    with Writer(hot) as w:
        time.sleep(0.5)
        t_kill = time.monotonic()
        os.kill(hosts.procs["p"].pid, signal.SIGKILL)
        hosts.procs["p"].wait()
        time.sleep(1)
        assert w.stall_after(t_kill) < 5.0, w.stall_after(t_kill)
        hosts.start("p")
        s = _wait(hosts, w, "the new daemon to replicate", ok=lambda s: s is not None and s["state"] == "replicating",
                  timeout=300)
        assert any(h["event"] == "start-degraded" and "dead daemon" in h["reason"] for h in s["history"]), s
        assert _resyncs(s) == 1, s["history"]
        # The orphan went politely, or (a slow disconnect) by aborting what the dead daemon recorded.
        assert re.search(rf"NBD {old_nbd} of the dead daemon: (disconnected|slow to disconnect: [0-2] of its 2 "
                         r"connection\(s\) aborted)", hosts.log("p")), hosts.log("p")
    assert w.stall_after(t_kill) < 5.0, w.stall_after(t_kill)
    if s["nbd"] != old_nbd:     # the orphan was disconnected (and removed), not left attached to nothing
        size = f"/sys/block/{os.path.basename(old_nbd)}/size"

        def released():
            if not os.path.exists(size):
                return True
            with open(size) as f:
                return f.read().strip() == "0"

        poll.wait_for(released, f"{old_nbd} to be released", timeout=30)   # the kernel does it asynchronously
    p = _file(hosts.dir / "p.img")
    assert p == _file(hosts.dir / "s.img")
    for blk, data in w.last.items():
        assert p[blk * 4 * KiB:(blk + 1) * 4 * KiB] == data, blk
    print(f"\nprimary daemon killed under load: longest write {w.stall_after(t_kill):.2f} s; "
          f"the next daemon resynced {s['last_resync']['differing_bytes'] >> 10} KiB")
