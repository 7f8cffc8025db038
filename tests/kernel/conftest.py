"""Fixtures of the kernel tier: real loop and dm devices inside the test VM.

Every test gets a clean kernel: after it, any dm device or loop device still
present is removed and the test is reported as having leaked it.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import time

import pytest

from dmrepl import poll
from dmrepl.kernel import dm, loop

MiB = 1 << 20


def _require_kernel():
    if not os.path.exists(dm.CONTROL_PATH):
        pytest.fail("device-mapper is missing on this host: the kernel tier runs inside the test VM "
                    "(scripts/test, or scripts/vm -- python -m pytest -m kernel)",
                    pytrace=False)
    if os.geteuid() != 0:
        pytest.fail("the kernel tier needs root", pytrace=False)


def _our_processes() -> list[tuple[int, str]]:
    out = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    continue
        except (OSError, IndexError):
            continue
        if "nbdkit" in cmd or "dmrepl.daemon" in cmd:
            out.append((int(pid), cmd.strip()))
    return out


def _sweep() -> list[str]:
    """Kill dmrepl's processes, remove every dm device, detach every loop device; return what was found."""
    left = []
    for pid, cmd in _our_processes():
        left.append(f"process:{pid}:{cmd[:60]}")
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    if left:
        poll.wait_for(_our_processes, "killed dmrepl processes to exit", ok=lambda v: v == [])
    with dm.Control() as ctl:
        names = [d.name for d in ctl.list_devices()]
        left += [f"dm:{n}" for n in names]
        dm.remove_tree(ctl, names)
    for dev in loop.list_attached():
        left.append(f"loop:{dev}")
        try:
            loop.detach(dev)
        except loop.LoopError as e:
            if e.errno != errno.ENXIO:
                raise
    # LOOP_CLR_FD completes asynchronously once the last opener is gone.
    poll.wait_for(loop.list_attached, "loop devices to detach", ok=lambda v: v == {})
    return left


@pytest.fixture(autouse=True)
def clean_kernel():
    _require_kernel()
    before = _sweep()
    assert not before, f"an earlier test left devices behind: {before}"
    yield
    left = _sweep()
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
        self.ctl.create(full, f"{dm.UUID_PREFIX}test-{full}")
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
