"""Both daemons end to end, started as a user starts them (`dmrepl up NAME`), one per network
namespace inside the VM (kernel tier, e2e; the two hosts: daemons_lab.py).
"""

from __future__ import annotations

import json
import os
import threading
import time

import pytest
from daemons_lab import ACTIVE, DISK, NAME, TOP, MiB

from dmrepl import poll
from dmrepl.kernel import blockdev
from dmrepl.names import StackNames


def test_initial_sync_checkpoints_and_failover_end_to_end(hosts):
    hosts.start_secondary()
    hosts.start_primary()
    s = hosts.status()
    assert s["checkpoint"] == 1 and s["mirror_health"] == "AA", s
    assert "initial sync: 32 MiB copied" in hosts.log("p")
    assert blockdev.read_at(ACTIVE, 0, DISK) == b"\x11" * DISK        # checkpoint 1 = P after the sync

    blockdev.write_at(TOP, 4 * MiB, b"\x22" * (2 * MiB))             # a consumer of the primary writes
    assert blockdev.read_at(ACTIVE, 4 * MiB, MiB) == b"\x11" * MiB   # the standby view stays at checkpoint 1
    r = hosts.cli("p", "checkpoint", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["checkpoint"] == 2
    at_checkpoint = blockdev.read_at(TOP, 0, DISK)
    blockdev.write_at(TOP, 0, b"\x33" * MiB)                         # the primary goes on writing
    assert blockdev.read_at(ACTIVE, 0, DISK) == at_checkpoint
    with open(hosts.dir / "p.img", "rb") as f:
        assert f.read(MiB) == b"\x33" * MiB

    status = hosts.cli("p", "status")
    assert "primary, REPLICATING" in status.stdout and "checkpoint 2" in status.stdout, status.stdout

    r = hosts.cli("s", "failover", "--json")                         # the secondary takes over
    assert r.returncode == 0, r.stderr
    assert blockdev.read_at(ACTIVE, 0, DISK) == at_checkpoint
    blockdev.write_at(ACTIVE, 8 * MiB, b"\x44" * MiB)                 # and writes on its own
    want = bytearray(at_checkpoint)
    want[8 * MiB:9 * MiB] = b"\x44" * MiB
    assert blockdev.read_at(ACTIVE, 0, DISK) == bytes(want)
    # The fenced secondary is gone for the primary: it says so, with the reason.
    s = poll.wait_for(hosts.status, "the primary to notice", ok=lambda s: s["state"] == "degraded")
    assert s["reason"], s
    r = hosts.cli("p", "checkpoint")
    assert r.returncode == 1 and "is degraded" in r.stderr and "invalid state" in r.stderr, r.stderr


def test_a_cut_link_makes_the_primary_degraded_without_hanging_writes(hosts):
    hosts.nbd_timeout_s = 2
    hosts.write_configs()
    hosts.start_secondary()
    hosts.start_primary("--assume-clean")
    assert "initial sync" not in hosts.log("p")
    hosts.lab.link_down("s")
    t0 = time.monotonic()
    done = {}

    def write():
        blockdev.write_at(TOP, MiB, b"\x55" * MiB)
        done["s"] = time.monotonic() - t0

    t = threading.Thread(target=write, daemon=True)
    t.start()
    s = poll.wait_for(hosts.status, "the primary to notice the cut",
                      ok=lambda s: s["state"] == "degraded", timeout=15)
    noticed = time.monotonic() - t0
    t.join(timeout=30)
    assert "s" in done, "a primary write hung with the link cut"
    # Heartbeats every 0.2 s, 3 missed; the NBD timeout is 2 s: either way within a few seconds.
    assert noticed < 10, (noticed, s)
    assert any(w in s["reason"] for w in ("heartbeat", "link", "leg")), s
    assert "DEGRADED" in hosts.log("p")
    with open(hosts.dir / "p.img", "rb") as f:
        f.seek(MiB)
        assert f.read(MiB) == b"\x55" * MiB
    hosts.lab.link_up("s")


@pytest.mark.parametrize("change,reason", [
    (dict(resource_id="other-id"), "refused this host: resource id: this host has 'other-id', the peer 'r5-id'"),
    (dict(primary="chunk_kib = 8\n"), "refused this host: chunk size: this host expects 8 KiB, the peer 4 KiB"),
])
def test_a_peer_that_disagrees_is_refused_and_nothing_changes(hosts, change, reason):
    hosts.write_configs(**change)
    hosts.start_secondary()
    before = (hosts.dir / "s-state" / NAME / "state.json").read_text()
    proc = hosts.start("p")
    assert proc.wait(timeout=60) == 1
    log = hosts.log("p")
    assert reason in log, log
    assert not os.path.exists(TOP) and not os.path.exists(StackNames(NAME).mapper_path("mirror"))
    assert (hosts.dir / "s-state" / NAME / "state.json").read_text() == before
    assert not os.path.exists(hosts.dir / "p-state" / NAME / "state.json")


def test_a_wrong_key_is_refused(hosts):
    hosts.start_secondary()
    (hosts.dir / "p.key").write_text(os.urandom(32).hex() + "\n")
    (hosts.dir / "p.key").chmod(0o600)
    cfg = (hosts.dir / "p.toml").read_text().replace(hosts.key, str(hosts.dir / "p.key"))
    (hosts.dir / "p.toml").write_text(cfg)
    proc = hosts.start("p")
    assert proc.wait(timeout=60) == 1
    assert "control link" in hosts.log("p")
    assert not os.path.exists(TOP)
    assert "refused" in hosts.log("s")
