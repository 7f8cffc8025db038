"""Fixtures of the kernel tier: real loop and dm devices inside the test VM.

Every test gets a clean kernel: after it, any dm device of dmrepl's, loop device
over the run's files or process the run started that is still there is removed
(tests/sweep.py, which touches nothing else and refuses to run outside the test
VM) and the test is reported as having leaked it.
"""

from __future__ import annotations

import os
import shutil
from typing import NamedTuple

import daemons_lab
import pytest
import sweep

from dmrepl.kernel import dm, loop
from dmrepl.kernel.tables import Snapshot, SnapshotOrigin
from dmrepl.lab import Lab
from dmrepl.names import UUID_PREFIX

MiB = 1 << 20


def _require_kernel():
    if not os.path.exists(dm.CONTROL_PATH):
        pytest.fail("device-mapper is missing on this host: the kernel tier runs inside the test VM "
                    "(scripts/test, or scripts/vm -- python -m pytest -m kernel)",
                    pytrace=False)
    if os.geteuid() != 0:
        pytest.fail("the kernel tier needs root", pytrace=False)


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory) -> str:
    """The test run's own directory: every file a test attaches as a loop device lies under it."""
    return str(tmp_path_factory.getbasetemp())


@pytest.fixture(autouse=True)
def clean_kernel(run_dir):
    _require_kernel()
    before = sweep.sweep(run_dir)
    assert not before, f"an earlier test left devices behind: {before}"
    yield
    left = sweep.sweep(run_dir)
    assert not left, f"this test left devices behind (swept now): {left}"


@pytest.fixture
def tmp_path(tmp_path):
    """pytest's tmp_path, removed after every test: the guest's /tmp is a tmpfs of
    half the VM's memory, and these tests write real data (whole disks)."""
    yield tmp_path
    shutil.rmtree(tmp_path, ignore_errors=True)


@pytest.fixture
def ctl():
    with dm.Control() as c:
        yield c


class Loops:
    """Sparse files attached as loop devices, detached at teardown whatever happened."""

    def __init__(self, directory):
        self.directory = directory
        self.devices: list[str] = []

    def make(self, name: str, size_bytes: int, fill: bytes | None = None) -> str:
        path = os.path.join(self.directory, f"{name}.img")
        with open(path, "wb") as f:
            f.truncate(size_bytes)
            if fill is not None:
                block = fill * (MiB // len(fill))
                for _ in range(size_bytes // MiB):
                    f.write(block)
        dev = loop.attach(path)
        self.devices.append(dev)
        return dev

    def cleanup(self):
        for dev in self.devices:
            try:
                loop.detach(dev)
            except loop.LoopError:
                pass


@pytest.fixture
def loops(tmp_path):
    lp = Loops(str(tmp_path))
    try:
        yield lp
    finally:
        lp.cleanup()


class Devices:
    """dm devices created by a test, removed at teardown in stacking order."""

    def __init__(self, ctl: dm.Control, prefix: str):
        self.ctl = ctl
        self.prefix = prefix
        self.names: list[str] = []

    def create(self, name: str, targets) -> str:
        full = f"{self.prefix}{name}"
        self.ctl.create(full, f"{UUID_PREFIX}test-{full}")
        self.names.append(full)
        if targets is not None:
            self.ctl.load(full, targets)
            self.ctl.resume(full)
        return full

    def cleanup(self):
        dm.remove_tree(self.ctl, reversed(self.names))


@pytest.fixture
def devices(ctl):
    d = Devices(ctl, "dmrepl-test-")
    try:
        yield d
    finally:
        d.cleanup()


class SnapshotPair(NamedTuple):
    disk: str       # the loop device under both
    origin: str     # /dev/mapper path of the snapshot-origin
    snap: str       # /dev/mapper path of the snapshot
    cow: str        # the loop device of its store
    name: str       # the snapshot's dm name


@pytest.fixture
def snapshot(ctl, loops, devices) -> SnapshotPair:
    """snapshot-origin over a 16 MiB disk of 0x11 and a persistent snapshot of it (4 KiB chunks)
    on an 8 MiB store."""
    disk = loops.make("origin", 16 * MiB, fill=b"\x11")
    cow = loops.make("cow", 8 * MiB)
    size = 16 * MiB // 512
    origin = devices.create("origin", None)
    ctl.load(origin, [SnapshotOrigin(0, size, disk)])
    snap = devices.create("snap", [Snapshot(0, size, disk, cow, "P", 8)])
    ctl.resume(origin)
    return SnapshotPair(disk, f"/dev/mapper/{origin}", f"/dev/mapper/{snap}", cow, snap)


def free_port() -> int:
    """A TCP port nobody listens on right now (on loopback)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(name="free_port")
def free_port_fixture():
    return free_port


@pytest.fixture
def nl():
    """An nbd netlink handle and a list of the device indexes a test attached: all disconnected after."""
    from dmrepl import poll
    from dmrepl.nbd import netlink

    with netlink.NBDNetlink() as n:
        attached: list[int] = []
        yield n, attached
        for index in attached:
            try:
                n.disconnect(index)
            except netlink.NBDNetlinkError:
                pass
            poll.wait_for(lambda: n.is_connected(index), f"/dev/nbd{index} to disconnect", ok=lambda v: not v)


LOGS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                    "build", "test-logs")


@pytest.fixture
def hosts(tmp_path, request):
    # The daemons' logs go to the project's build/test-logs/TEST/{p,s}.log: they outlive the
    # guest's /tmp and can be followed from the host while the test runs.
    logs = os.path.join(LOGS, request.node.name)
    shutil.rmtree(logs, ignore_errors=True)
    os.makedirs(logs)
    with Lab(sweep.lab_tag()) as lab:
        h = daemons_lab.Hosts(tmp_path, lab, logs)
        try:
            yield h
        finally:
            h.stop()


