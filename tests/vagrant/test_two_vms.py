"""Two real VMs (issue 9): the lab's primary and secondary, each its own kernel, disks and systemd,
joined by the lab's private network.  Driven from the host, inside the lab's network namespace,
by `vagrant/lab test` (ssh to the guests, virsh for the VMs, ip for the host side of the link).

The tests share one lab and run in this file's order: replication with checkpoints, the link cut
with the primary going on, the secondary hard-reset, the failover (last: it ends the primary).
The host keeps a model of the disk: every byte the tests write is written there too, and each
check compares a guest's device with the model, byte for byte (sha256 of the whole device).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shlex
import subprocess
import time

import pytest

pytestmark = pytest.mark.timeout(900, method="signal")

MiB = 1 << 20
DISK = 64 * MiB                     # vagrant/provision's partition dmrepl-disk
NAME = "lab"
PRIMARY_DEV = f"/dev/dmrepl/{NAME}/primary"
ACTIVE_DEV = f"/dev/dmrepl/{NAME}/active"
RAW_DISK = "/dev/disk/by-partlabel/dmrepl-disk"
LINK_NETWORK = "dmrepl-lab-link"


class Guest:
    """One lab VM: commands as root over ssh (the config `vagrant ssh-config` wrote), its domain."""

    def __init__(self, lab_dir: str, name: str):
        self.lab_dir, self.name = lab_dir, name
        self.domain = f"dmrepl-lab-{name}"

    def run(self, script: str, *, data: bytes | None = None, timeout: float = 300, check: bool = True) -> str:
        r = subprocess.run(["ssh", "-F", os.path.join(self.lab_dir, "ssh-config"), "-o", "LogLevel=ERROR",
                            "-o", "ConnectTimeout=10", self.name, "sudo", "bash", "-c", shlex.quote(script)],
                           input=data, capture_output=True, timeout=timeout)
        if check and r.returncode != 0:
            raise AssertionError(f"{self.name}: `{script}` exited {r.returncode}: "
                                 f"{r.stderr.decode(errors='replace').strip()}")
        return r.stdout.decode()

    def write(self, device: str, offset: int, data: bytes) -> float:
        """Write data at offset through the page cache's back door (O_DIRECT, then a flush);
        return the seconds it took."""
        t0 = time.monotonic()
        self.run(f"dd of={device} bs=64K seek={offset} oflag=direct,seek_bytes conv=fsync status=none",
                 data=data)
        return time.monotonic() - t0

    def sha256(self, device: str) -> str:
        return self.run(f"dd if={device} bs=1M iflag=direct status=none | sha256sum").split()[0]

    def status(self) -> dict:
        return json.loads(self.run(f"dmrepl status {NAME} --json"))

    def wait_ssh(self, timeout: float = 240) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.run("true", timeout=30)
                return
            except (AssertionError, subprocess.TimeoutExpired):
                if time.monotonic() > deadline:
                    raise
                time.sleep(2)


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


def virsh(*args: str) -> str:
    return subprocess.run(["virsh", "-q", *args], check=True, capture_output=True, text=True).stdout


def link_tap(guest: Guest) -> str:
    """The host side of guest's interface on the lab's private network (a tap in the namespace)."""
    for line in virsh("domiflist", guest.domain).splitlines():
        fields = line.split()           # Interface Type Source Model MAC
        if len(fields) >= 3 and fields[2] == LINK_NETWORK:
            return fields[0]
    raise AssertionError(f"{guest.domain} has no interface on {LINK_NETWORK}")


def wait_state(guest: Guest, want: str, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        st = guest.status()
        if st["state"] == want:
            return st
        if time.monotonic() > deadline:
            raise AssertionError(f"{guest.name} is {st['state']} ({st.get('reason')}), not {want}, "
                                 f"after {timeout:g} s")
        time.sleep(1)


def checkpoint(primary: Guest) -> int:
    out = json.loads(primary.run(f"dmrepl checkpoint {NAME} --json"))
    return out["checkpoint"]


@pytest.fixture(scope="module")
def lab():
    lab_dir = os.environ.get("DMREPL_LAB_DIR")
    if not lab_dir or not os.path.exists(os.path.join(lab_dir, "ssh-config")):
        raise pytest.UsageError("the vagrant tier runs inside the lab: vagrant/lab test")
    p, s = Guest(lab_dir, "primary"), Guest(lab_dir, "secondary")
    t0 = time.monotonic()
    p.run(f"dmrepl wait {NAME} --timeout 600", timeout=660)
    print(f"\nprimary replicating {time.monotonic() - t0:.1f} s after the lab was up")
    return p, s, Model()


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
    tap = link_tap(s)
    subprocess.run(["ip", "link", "set", tap, "down"], check=True)
    try:
        # The write that finds the link dead waits at most for the NBD timeout (15 s), then the
        # primary goes on alone.
        took = model.write(p, 30 * MiB, MiB)
        print(f"\nfirst write after the link cut: {took:.1f} s")
        st = wait_state(p, "degraded", 60)
        more = [model.write(p, off, 256 * 1024) for off in (2 * MiB, 40 * MiB, 50 * MiB)]
        print(f"writes while degraded: {', '.join(f'{t:.2f} s' for t in more)}")
        assert p.sha256(PRIMARY_DEV) == model.sha256()
        assert st["checkpoint"] == p.status()["checkpoint"]
    finally:
        subprocess.run(["ip", "link", "set", tap, "up"], check=True)
    t0 = time.monotonic()
    p.run(f"dmrepl wait {NAME} --timeout 300", timeout=330)
    resync = p.status()["last_resync"]
    print(f"replicating again {time.monotonic() - t0:.1f} s after the link came back: {resync}")
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
    tap = link_tap(s)
    subprocess.run(["ip", "link", "set", tap, "down"], check=True)
    try:
        t0 = time.monotonic()
        s.wait_ssh()
        # systemd starts dmrepl@lab at boot: the secondary's stack again, its view at checkpoint n.
        s.run(f"for i in $(seq 120); do [ -b {ACTIVE_DEV} ] && exit 0; sleep 1; done; exit 1", timeout=150)
        print(f"secondary back {time.monotonic() - t0:.1f} s after its start")
        assert s.sha256(ACTIVE_DEV) == at_checkpoint
        assert s.status()["checkpoint"] == n
    finally:
        subprocess.run(["ip", "link", "set", tap, "up"], check=True)
    t0 = time.monotonic()
    p.run(f"dmrepl wait {NAME} --timeout 300", timeout=330)
    print(f"replicating again {time.monotonic() - t0:.1f} s after the link came back: "
          f"{p.status()['last_resync']}")
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
