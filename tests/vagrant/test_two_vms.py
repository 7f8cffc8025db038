"""Two real VMs (issue 9): the lab's primary and secondary, each its own kernel, disks and systemd,
joined by the lab's private network.  Driven from the host, inside the lab's network namespace,
by `vagrant/lab test` (ssh to the guests, virsh for the VMs, ip for the host side of the link).

The tests share one lab and run in this file's order: the lab's isolation, replication with
checkpoints, the link cut with the primary going on, the secondary hard-reset, the failover
(last: it ends the primary).
The host keeps a model of the disk: every byte the tests write is written there too, and each
check compares a guest's device with the model, byte for byte (sha256 of the whole device).
"""

from __future__ import annotations

import hashlib
import os
import random
import subprocess
import time

import pytest
from guests import (
    ACTIVE_DEV,
    LINK_NETWORK,
    NAME,
    PRIMARY_DEV,
    RAW_DISK,
    Guest,
    checkpoint,
    lab_dir,
    link_down,
    virsh,
    wait_state,
)

pytestmark = pytest.mark.timeout(900, method="signal")

MiB = 1 << 20
DISK = 64 * MiB                     # vagrant/provision's partition dmrepl-disk


class Model:
    """What the primary's disk holds, kept on the host."""

    def __init__(self):
        self.disk = bytearray(DISK)     # the lab's disk starts as zeroes (a fresh raw volume)
        self.rng = random.Random(9)

    def pattern(self, size: int) -> bytes:
        return self.rng.randbytes(size)

    def write(self, guest: Guest, offset: int, size: int) -> float:
        data = self.pattern(size)
        took = guest.write(PRIMARY_DEV, offset, data)
        self.disk[offset:offset + size] = data
        return took

    def sha256(self) -> str:
        return hashlib.sha256(self.disk).hexdigest()


def last_resync(primary: Guest, since: float) -> dict:
    """The primary's last resync (printed): what it compared and copied."""
    r = primary.status()["last_resync"]
    print(f"replicating again {time.monotonic() - since:.1f} s after the link came back: resync compared "
          f"{r['compared_bytes'] >> 10} KiB, {r['differing_bytes'] >> 10} KiB differed, copied "
          f"{r['copied_bytes'] >> 10} KiB, sent {r['sent_bytes'] >> 10} KiB")
    return r


@pytest.fixture(scope="module")
def lab():
    try:
        lab_dir()
    except RuntimeError as e:
        raise pytest.UsageError(str(e)) from None
    p, s = Guest("primary"), Guest("secondary")
    t0 = time.monotonic()
    p.run(f"dmrepl wait {NAME} --timeout 600", timeout=660)
    print(f"\nprimary replicating {time.monotonic() - t0:.1f} s after the lab was up")
    return p, s, Model()


def test_the_lab_is_isolated(lab):
    """Both networks without NAT or forwarding, their bridges in the lab's namespace only (told
    by MAC address: bridge names are counted per libvirtd, a host's own virbr0 may exist)."""
    macs = []
    for net in ("dmrepl-lab-mgmt", LINK_NETWORK):
        xml = virsh("net-dumpxml", net)
        assert "<forward" not in xml, f"{net} forwards: {xml}"
        macs.append(xml.split("<mac address='", 1)[1].split("'", 1)[0].lower())
    here = subprocess.run(["ip", "-o", "link", "show"], check=True, capture_output=True, text=True).stdout
    host = subprocess.run(["nsenter", f"--net={os.environ['DMREPL_LAB_HOST_NETNS']}", "ip", "-o", "link", "show"],
                          check=True, capture_output=True, text=True).stdout
    for mac in macs:
        assert f"link/ether {mac} " in here
        assert f"link/ether {mac} " not in host
    # No route out of the guests but their own two networks.
    for guest in lab[:2]:
        routes = guest.run("ip -4 route show").splitlines()
        assert all(r.split()[0] != "default" for r in routes), routes


def test_replication_with_checkpoints(lab):
    p, s, model = lab
    # The initial copy made S's disk P's (zeroes): a checkpoint shows it in the standby view.
    checkpoint(p)
    assert s.sha256(ACTIVE_DEV) == model.sha256()
    for offset, size in ((0, 4 * MiB), (20 * MiB + 4096, 3 * MiB), (DISK - MiB, MiB)):
        model.write(p, offset, size)
    at_checkpoint = model.sha256()
    n = checkpoint(p)
    assert p.sha256(PRIMARY_DEV) == at_checkpoint
    assert s.sha256(ACTIVE_DEV) == at_checkpoint
    # Writes after the checkpoint reach S's disk at once, and its standby view stays at n.
    model.write(p, 8 * MiB, 2 * MiB)
    assert s.sha256(RAW_DISK) == model.sha256()
    assert s.sha256(ACTIVE_DEV) == at_checkpoint
    assert p.status()["checkpoint"] == n
    n2 = checkpoint(p)
    assert n2 == n + 1
    assert s.sha256(ACTIVE_DEV) == model.sha256()


def test_link_cut_and_the_primary_goes_on(lab):
    p, s, model = lab
    with link_down(s):
        # The write that finds the link dead waits at most for the NBD timeout (15 s), then the
        # primary goes on alone.
        took = model.write(p, 30 * MiB, MiB)
        print(f"\nfirst write after the link cut: {took:.1f} s")
        st = wait_state(p, "degraded", 60)
        more = [model.write(p, off, 256 * 1024) for off in (2 * MiB, 40 * MiB, 50 * MiB)]
        print(f"writes while degraded: {', '.join(f'{t:.2f} s' for t in more)}")
        assert p.sha256(PRIMARY_DEV) == model.sha256()
        assert st["checkpoint"] == p.status()["checkpoint"]
    t0 = time.monotonic()
    p.run(f"dmrepl wait {NAME} --timeout 300", timeout=330)
    # A delta: exactly what was written while the link was down, not the disk.
    assert last_resync(p, t0)["copied_bytes"] == MiB + 3 * 256 * 1024
    checkpoint(p)
    assert s.sha256(ACTIVE_DEV) == model.sha256()


def test_secondary_hard_reset_keeps_its_last_checkpoint(lab):
    p, s, model = lab
    at_checkpoint = model.sha256()      # the last test ended with a checkpoint of exactly this
    n = p.status()["checkpoint"]
    model.write(p, 12 * MiB, 2 * MiB)   # on S's disk, not in its view
    virsh("destroy", s.domain)          # power cut
    took = model.write(p, 44 * MiB, MiB)
    print(f"\nfirst write after the secondary's power cut: {took:.1f} s")
    wait_state(p, "degraded", 60)
    virsh("start", s.domain)
    # The link held down while S boots (its new tap exists once the domain runs): the primary's
    # resync, which ends with a checkpoint, must not reach S before its view is read.
    with link_down(s):
        t0 = time.monotonic()
        s.wait_ssh()
        # systemd starts dmrepl@lab at boot: the secondary's stack again, its view at checkpoint n.
        s.run(f"for i in $(seq 120); do [ -b {ACTIVE_DEV} ] && exit 0; sleep 1; done; exit 1", timeout=150)
        print(f"secondary back {time.monotonic() - t0:.1f} s after its start")
        assert s.sha256(ACTIVE_DEV) == at_checkpoint
        assert s.status()["checkpoint"] == n
    t0 = time.monotonic()
    p.run(f"dmrepl wait {NAME} --timeout 300", timeout=330)
    # What the primary wrote while the secondary was off; the write before the power cut had
    # reached the secondary's disk (a write completes on both legs).
    assert last_resync(p, t0)["copied_bytes"] == MiB
    checkpoint(p)
    assert s.sha256(ACTIVE_DEV) == model.sha256()


def test_failover_takes_over_at_the_last_checkpoint(lab):
    p, s, model = lab
    model.write(p, 16 * MiB, 4 * MiB)
    checkpoint(p)
    at_checkpoint = model.sha256()
    model.write(p, 0, 2 * MiB)          # after the checkpoint: rolled back by the failover
    model.write(p, 60 * MiB, MiB)
    assert s.sha256(RAW_DISK) == model.sha256()
    virsh("destroy", p.domain)          # the primary is lost
    t0 = time.monotonic()
    s.run(f"dmrepl failover {NAME}", timeout=600)
    print(f"\nfailover {time.monotonic() - t0:.1f} s")
    assert s.sha256(ACTIVE_DEV) == at_checkpoint
    assert s.sha256(RAW_DISK) == at_checkpoint
