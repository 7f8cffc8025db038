"""device-mapper ioctls: create, load, suspend, resume, remove, status, wait (kernel tier)."""

import errno
import os
import select
import stat
import threading

import pytest
import pyudev

from dmrepl.kernel import blockdev, dm
from dmrepl.kernel.errors import BlockDeviceError, DMError
from dmrepl.kernel.status import SnapshotStatus
from dmrepl.kernel.tables import Error, Linear, Snapshot, SnapshotOrigin
from dmrepl.names import UUID_PREFIX

MiB = 1 << 20
SECTORS_PER_MiB = MiB // 512


def test_version_and_targets(ctl):
    assert ctl.version()[0] == 4
    versions = ctl.list_target_versions()
    for t in ("linear", "snapshot", "snapshot-origin", "snapshot-merge", "era", "mirror"):
        assert t in versions, f"{t} not registered: {sorted(versions)}"


def test_create_node_load_resume_remove(ctl, loops):
    disk = loops.make("d", 8 * MiB)
    name = "dmrepl-test-lin"
    info = ctl.create(name, UUID_PREFIX + "test-lin")
    try:
        assert not info.live_table
        # Two targets: the device is the second half of the disk, then the first.
        ctl.load(name, [Linear(0, 4 * SECTORS_PER_MiB, disk, 4 * SECTORS_PER_MiB),
                        Linear(4 * SECTORS_PER_MiB, 4 * SECTORS_PER_MiB, disk, 0)])
        assert ctl.info(name).inactive_table
        info = ctl.resume(name)
        assert info.live_table and not info.suspended and info.target_count == 2
        st = os.stat(f"/dev/mapper/{name}")  # udev's symlink, or our node without udev
        assert stat.S_ISBLK(st.st_mode) and st.st_rdev == os.makedev(info.major, info.minor)
        blockdev.write_at(disk, 0, b"A" * 4096)
        blockdev.write_at(disk, 4 * MiB, b"B" * 4096)
        assert blockdev.read_at(f"/dev/mapper/{name}", 0, 4096) == b"B" * 4096
        assert blockdev.read_at(f"/dev/mapper/{name}", 4 * MiB, 4096) == b"A" * 4096
        assert blockdev.size_bytes(f"/dev/mapper/{name}") == 8 * MiB
        table = ctl.table(name)
        dev = os.stat(disk).st_rdev
        assert [(s.start, s.length, s.target_type, s.text) for s in table] == [
            (0, 4 * SECTORS_PER_MiB, "linear", f"{os.major(dev)}:{os.minor(dev)} {4 * SECTORS_PER_MiB}"),
            (4 * SECTORS_PER_MiB, 4 * SECTORS_PER_MiB, "linear", f"{os.major(dev)}:{os.minor(dev)} 0")]
        assert ctl.deps(name) == [(os.major(dev), os.minor(dev))]
        assert [(d.name, d.uuid) for d in ctl.list_devices()] == [(name, UUID_PREFIX + "test-lin")]
        # suspend / reload / resume swaps the table; flush and noflush both work.
        assert ctl.suspend(name).suspended
        ctl.load(name, [Error(0, 8 * SECTORS_PER_MiB)])
        ctl.resume(name)
        with pytest.raises(BlockDeviceError) as e:
            blockdev.read_at(f"/dev/mapper/{name}", 0, 4096)
        assert e.value.errno == errno.EIO
        assert ctl.suspend(name, flush=False).suspended
        assert not ctl.resume(name).suspended
    finally:
        ctl.remove(name)
    assert not os.path.exists(f"/dev/mapper/{name}")
    assert not ctl.exists(name)


def test_bad_table_is_einval_with_table_in_message(ctl, loops, devices):
    disk = loops.make("d", 4 * MiB)
    name = devices.create("bad", None)
    with pytest.raises(DMError) as e:
        ctl.load(name, [Snapshot(0, 8192, disk, disk, "P", 8)])  # COW == origin: refused
    assert e.value.errno == errno.EINVAL
    assert e.value.call == "DM_TABLE_LOAD"
    assert f"0 8192 snapshot {disk} {disk} P 8" in str(e.value)
    with pytest.raises(DMError) as e:
        ctl.load(name, [Linear(0, 16 * SECTORS_PER_MiB, disk, 0)])  # beyond the disk's end
    assert e.value.errno == errno.EINVAL


def test_duplicate_name_and_missing_device(ctl, devices):
    name = devices.create("dup", None)
    with pytest.raises(DMError) as e:
        ctl.create(name, UUID_PREFIX + "other")
    assert e.value.errno == errno.EBUSY
    with pytest.raises(DMError) as e:
        ctl.info("dmrepl-test-does-not-exist")
    assert e.value.errno == errno.ENXIO
    assert str(e.value) == "DM_DEV_STATUS dmrepl-test-does-not-exist: No such device or address (ENXIO)"


def test_remove_busy_device_is_ebusy(ctl, loops, devices):
    disk = loops.make("d", 4 * MiB)
    name = devices.create("busy", [Linear(0, 4 * SECTORS_PER_MiB, disk, 0)])
    fd = os.open(f"/dev/mapper/{name}", os.O_RDONLY)
    try:
        with pytest.raises(DMError) as e:
            ctl.remove(name, busy_timeout=0.05, delay=0.01)
        assert e.value.errno == errno.EBUSY
        assert str(e.value).startswith(f"DM_DEV_REMOVE {name}: Device or resource busy (EBUSY)")
        assert ctl.info(name).open_count == 1
    finally:
        os.close(fd)


def test_invalid_name_rejected_before_the_kernel(ctl):
    for bad in ("a/b", "", "x" * 200):
        with pytest.raises(ValueError):
            ctl.create(bad, UUID_PREFIX + "bad")
    assert ctl.list_devices() == []


def _snapshot_of_small_store(ctl, loops, devices) -> tuple[str, str]:
    """A 16 MiB origin (0x11) and its snapshot on a 1 MiB store: 4 MiB of writes overflow it."""
    origin_disk = loops.make("s", 16 * MiB, fill=b"\x11")
    cow = loops.make("cow", MiB)
    size = 16 * SECTORS_PER_MiB
    origin = devices.create("origin", None)
    ctl.load(origin, [SnapshotOrigin(0, size, origin_disk)])
    snap = devices.create("snap", [Snapshot(0, size, origin_disk, cow, "P", 8)])
    ctl.resume(origin)
    return origin, snap


def test_snapshot_fills_up_raises_event_and_goes_invalid(ctl, loops, devices):
    origin, snap = _snapshot_of_small_store(ctl, loops, devices)
    before = ctl.info(snap)
    assert SnapshotStatus.parse(ctl.status(snap)[0].text).valid
    woke = {}

    def waiter():
        woke["info"] = ctl.dev_wait(snap, before.event_nr)

    t = threading.Thread(target=waiter)
    t.start()
    # 4 MiB of origin writes need 4 MiB of copied chunks: the 1 MiB store overflows.
    blockdev.write_at(f"/dev/mapper/{origin}", 0, b"\x22" * (4 * MiB))
    t.join(30)
    assert not t.is_alive(), "DM_DEV_WAIT did not return after the snapshot was invalidated"
    assert woke["info"].event_nr > before.event_nr
    assert SnapshotStatus.parse(ctl.status(snap)[0].text).state == "invalid"
    with pytest.raises(OSError) as e:
        blockdev.read_at(f"/dev/mapper/{snap}", 0, 4096)
    assert e.value.errno == errno.EIO
    # The origin carries on regardless.
    assert blockdev.read_at(f"/dev/mapper/{origin}", 0, 4096) == b"\x22" * 4096


def test_an_armed_control_turns_readable_at_a_device_event(ctl, loops, devices):
    """DM_DEV_ARM_POLL: the primary's loop selects on its control fd so that a dm event (a mirror
    leg failing, a store invalidated) wakes it at once; here a store's overflow."""
    origin, snap = _snapshot_of_small_store(ctl, loops, devices)
    uevents = pyudev.Monitor.from_netlink(pyudev.Context(), source="kernel")
    uevents.filter_by("block")
    uevents.start()
    with dm.Control() as watcher:
        watcher.arm_events()
        assert select.select([watcher], [], [], 0.3)[0] == []
        blockdev.write_at(f"/dev/mapper/{origin}", 0, b"\x22" * (4 * MiB))    # the 1 MiB store overflows
        assert select.select([watcher], [], [], 30)[0] == [watcher]
        watcher.arm_events()                                                # seen: quiet again
        assert select.select([watcher], [], [], 0.3)[0] == []
    # udev hears nothing of it: a table event sends no uevent (only dm-mpath queues some).
    ours = {os.stat(f"/dev/mapper/{n}").st_rdev for n in (origin, snap)}
    heard = [(d.action, d.sys_name) for d in iter(lambda: uevents.poll(0.5), None) if d.device_number in ours]
    assert heard == []


def test_wait_event_times_out_without_event(ctl, loops, devices):
    disk = loops.make("d", 4 * MiB)
    name = devices.create("quiet", [Linear(0, 4 * SECTORS_PER_MiB, disk, 0)])
    info = ctl.info(name)
    assert ctl.wait_event(name, info.event_nr, timeout=0.3) is None


def test_message_to_target_without_handler_is_einval(ctl, loops, devices):
    disk = loops.make("d", 4 * MiB)
    name = devices.create("msg", [Linear(0, 4 * SECTORS_PER_MiB, disk, 0)])
    with pytest.raises(DMError) as e:
        ctl.message(name, "hello")
    assert e.value.errno == errno.EINVAL
    assert e.value.call == "DM_TARGET_MSG"


def test_large_table_grows_the_ioctl_buffer(ctl, loops, devices):
    """1000 targets: the table reply (~60 KiB) exceeds the first 16 KiB buffer (DM_BUFFER_FULL)."""
    disk = loops.make("d", 8 * MiB)
    targets = [Linear(i * 16, 16, disk, (999 - i) * 16) for i in range(1000)]
    name = devices.create("big", targets)
    table = ctl.table(name)
    assert len(table) == 1000
    assert (table[0].start, table[0].length, table[0].text.split()[1]) == (0, 16, str(999 * 16))
    assert (table[-1].start, table[-1].text.split()[1]) == (999 * 16, "0")
    assert len(ctl.status(name)) == 1000
    blockdev.write_at(disk, 0, b"\x7e" * 8192)  # the disk's first 16 sectors are the device's last
    assert blockdev.read_at(f"/dev/mapper/{name}", 999 * 16 * 512, 8192) == b"\x7e" * 8192
