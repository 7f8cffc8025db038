"""`dmrepl resize NAME`: the replicated device grows online on both hosts while a writer goes on;
the refusals change nothing; the primary lost in the middle leaves both hosts at one size, equal
(kernel tier, e2e).

Two "hosts" in one VM (daemons_lab: namespaces p and s, 32 MiB image files).  The images grow
by truncate; the new range of each holds different bytes (as grown LVs would), so the resync must
copy P's new range to S, and the standby view must show it after the next checkpoint.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest
from daemons_lab import DISK, NAME, START_TIMEOUT, TOP, MiB, Writer

from dmrepl import poll
from dmrepl.kernel import blockdev
from dmrepl.names import StackNames
from dmrepl.state import StateStore

pytestmark = [pytest.mark.kernel, pytest.mark.timeout(900, method="signal")]

NEW = 48 * MiB
ACTIVE, ORIGIN = StackNames(NAME).mapper_path("active"), StackNames(NAME).mapper_path("origin")


def _grow_image(path, size: int, tag: bytes) -> None:
    """The image `size` bytes long, its new range filled with `tag` (what a grown LV would hold)."""
    old = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size)
        f.seek(old)
        f.write((tag * (size // len(tag) + 1))[:size - old])


def _state(hosts, host: str):
    return StateStore(str(hosts.dir / f"{host}-state" / NAME)).load()


def _ok(r):
    assert r.returncode == 0, (r.stdout, r.stderr)
    return r.stdout


def _start_both(hosts) -> None:
    with open(hosts.dir / "s.img", "wb") as f:
        f.write(b"\x11" * DISK)                     # S equal to P: --assume-clean
    hosts.start_secondary()
    hosts.start_primary("--assume-clean")


def _resize_until_the_secondary_grew(hosts, *extra: str) -> subprocess.Popen:
    """Both hosts up with 1 MiB of 0x22 in a checkpoint, both images grown (different bytes in the
    new ranges), `dmrepl resize` started; returns once the secondary has grown (its event)."""
    _start_both(hosts)
    blockdev.write_at(TOP, 0, b"\x22" * MiB)
    _ok(hosts.cli("p", "checkpoint"))
    _grow_image(hosts.dir / "p.img", NEW, b"p-new-range.")
    _grow_image(hosts.dir / "s.img", NEW, b"s-garbage!")
    events = hosts.dir / "s-state" / NAME / "events.jsonl"
    before = events.read_text().count('"resize"')
    proc = subprocess.Popen([*hosts.command, "resize", NAME, "--config", hosts.config("p"), *extra],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    poll.wait_for(lambda: events.read_text().count('"resize"') > before, "the secondary to grow",
                  timeout=120, interval=0.002)
    return proc


def test_resize_grows_both_hosts_under_a_writer_and_refusals_change_nothing(hosts):
    _start_both(hosts)
    r = hosts.cli("p", "resize")
    assert r.returncode == 1 and "nothing to grow" in r.stderr, r.stderr
    r = hosts.cli("s", "resize")
    assert r.returncode == 1 and "runs on the primary" in r.stderr, r.stderr
    _grow_image(hosts.dir / "p.img", NEW, b"p-new-range.")
    with Writer(list(range(0, 64)) + list(range(4000, 4096)), pause_s=0.005) as w:
        # Only P grew: the secondary refuses, nothing changes on either host.
        r = hosts.cli("p", "resize")
        assert r.returncode == 1 and "refused by the secondary" in r.stderr and str(NEW) in r.stderr, r.stderr
        assert "nothing changed" in r.stderr, r.stderr
        st = hosts.status()
        assert st["state"] == "replicating", st
        assert blockdev.size_bytes(TOP) == DISK and blockdev.size_bytes(ORIGIN) == DISK
        assert (_state(hosts, "p").size_bytes, _state(hosts, "s").size_bytes) == (DISK, DISK)
        assert _state(hosts, "s").diverged is None

        _grow_image(hosts.dir / "s.img", NEW, b"s-garbage!")
        t0 = time.monotonic()
        r = hosts.cli("p", "resize", "--json", timeout=600)
        took = time.monotonic() - t0
        report = json.loads(_ok(r))
        w.check_deadline()
    assert (report["old_bytes"], report["new_bytes"]) == (DISK, NEW), report
    resynced = report["last_resync"]
    assert resynced["candidate_bytes"] >= NEW - DISK, resynced                  # the whole new range compared
    assert resynced["differing_bytes"] >= NEW - DISK - 64 * 1024, resynced      # and it differed (tags)
    assert max(s for _t, s in w.latencies) < 10, max(s for _t, s in w.latencies)
    st = hosts.status()
    assert st["state"] == "replicating" and blockdev.size_bytes(TOP) == NEW, st
    assert blockdev.size_bytes(ORIGIN) == NEW and blockdev.size_bytes(ACTIVE) == NEW
    assert (_state(hosts, "p").size_bytes, _state(hosts, "s").size_bytes) == (NEW, NEW)

    # The new range is the consumer's: a write there replicates; a checkpoint puts it in S's view.
    blockdev.write_at(TOP, NEW - MiB, b"\x77" * MiB)
    _ok(hosts.cli("p", "checkpoint"))
    with open(hosts.dir / "p.img", "rb") as f:
        p = f.read()
    with open(hosts.dir / "s.img", "rb") as f:
        assert f.read() == p                        # S byte for byte P, old range (the writer's) and new
    assert blockdev.read_at(ACTIVE, 0, NEW) == p
    assert p[DISK:DISK + 12] == b"p-new-range." and p[NEW - MiB:] == b"\x77" * MiB
    assert _state(hosts, "s").diverged is None
    print(f"\nresize {DISK >> 20} -> {NEW >> 20} MiB under a writer: {took:.1f} s to replicating, "
          f"{resynced['differing_bytes'] >> 10} KiB of {resynced['candidate_bytes'] >> 10} KiB compared differed; "
          f"longest write {max(s for _t, s in w.latencies):.2f} s")

    # Shrinking is refused.
    with open(hosts.dir / "p.img", "r+b") as f:
        f.truncate(DISK)
    r = hosts.cli("p", "resize")
    assert r.returncode == 1 and "shrinking is not supported" in r.stderr, r.stderr
    with open(hosts.dir / "p.img", "r+b") as f:
        f.truncate(NEW)


def test_the_primary_killed_after_the_secondary_grew_leaves_both_hosts_at_one_size(hosts):
    proc = _resize_until_the_secondary_grew(hosts)
    os.kill(hosts.procs["p"].pid, signal.SIGSTOP)       # the primary's power goes ...
    os.kill(hosts.procs["p"].pid, signal.SIGKILL)       # ... before it could grow (or just after)
    hosts.procs["p"].wait(timeout=30)
    proc.wait(timeout=60)
    grew = _state(hosts, "p").size_bytes == NEW
    hosts.start_primary()                               # takes the dead daemon's stack over
    st = poll.wait_for(hosts.status, "the primary to replicate again", ok=lambda s: s and s["state"] == "replicating",
                       timeout=START_TIMEOUT)
    size = NEW if grew else DISK
    assert blockdev.size_bytes(TOP) == size and blockdev.size_bytes(ORIGIN) == size, (grew, st)
    assert (_state(hosts, "p").size_bytes, _state(hosts, "s").size_bytes) == (size, size), grew
    if not grew:
        assert "back at that size" in hosts.log("s"), hosts.log("s")[-2000:]
    _ok(hosts.cli("p", "checkpoint"))
    assert blockdev.read_at(ACTIVE, 0, size) == blockdev.read_at(TOP, 0, size)
    assert blockdev.read_at(ACTIVE, 0, MiB) == b"\x22" * MiB
    print(f"\nprimary killed during resize: it had {'grown' if grew else 'not grown'}; both hosts at {size >> 20} MiB")


def test_a_power_loss_of_the_secondary_during_the_grow_leaves_both_hosts_at_one_size(hosts):
    """The secondary loses power (its daemon killed, its devices gone, its state file kept) right
    after it grew: the primary grew too or not, depending on whether the answer reached it; when
    the secondary is back, both hosts are at the primary's size and equal byte for byte."""
    proc = _resize_until_the_secondary_grew(hosts, "--no-wait")
    os.kill(hosts.procs["s"].pid, signal.SIGKILL)       # the secondary's power goes
    hosts.procs["s"].wait(timeout=30)
    assert hosts.cli("s", "down", "--force").returncode == 0
    assert _state(hosts, "s").size_bytes == NEW         # its grow was committed
    proc.wait(timeout=120)
    st = poll.wait_for(hosts.status, "the primary to go on without the secondary",
                       ok=lambda s: s and s["state"] == "degraded", timeout=60)
    size = _state(hosts, "p").size_bytes
    assert size in (DISK, NEW) and blockdev.size_bytes(TOP) == size, st
    blockdev.write_at(TOP, 2 * MiB, b"\x55" * MiB)     # the consumer goes on meanwhile
    hosts.start_secondary()
    poll.wait_for(hosts.status, "the pair to replicate again", ok=lambda s: s and s["state"] == "replicating",
                  timeout=START_TIMEOUT)
    assert _state(hosts, "s").size_bytes == size and blockdev.size_bytes(ORIGIN) == size
    if size == DISK:
        assert "back at that size" in hosts.log("s"), hosts.log("s")[-2000:]
    _ok(hosts.cli("p", "checkpoint"))
    with open(hosts.dir / "p.img", "rb") as f:
        p = f.read(size)
    with open(hosts.dir / "s.img", "rb") as f:
        assert f.read(size) == p
    assert blockdev.read_at(ACTIVE, 0, size) == p and p[2 * MiB:3 * MiB] == b"\x55" * MiB
    print(f"\nsecondary power loss during resize: the primary {'grew' if size == NEW else 'did not grow'}; "
          f"both hosts at {size >> 20} MiB, equal")
