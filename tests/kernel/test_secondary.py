"""The secondary stack: acceptance scenarios with exact bytes (kernel tier).

They follow QEMU's tests/unit/test-replication.c, with the true values that its
`memcmp <= 0` checks hide.  S is 64 MiB of 0x11; a "primary write" is a write
to the origin device (what the NBD server does); a "consumer write" is a write
to the active device.
"""

import errno
import os

import pytest

from dmrepl import poll
from dmrepl import state as st_mod
from dmrepl.config import SecondaryConfig
from dmrepl.errors import DmreplError
from dmrepl.kernel import blockdev, dm, loop
from dmrepl.secondary import Secondary

MiB = 1 << 20
DISK = 64 * MiB


def make_cfg(tmp_path, name="vm1", store_bytes=80 * MiB, fill=b"\x11", **over) -> SecondaryConfig:
    disk = tmp_path / "disk.img"
    with open(disk, "wb") as f:
        f.write(fill * DISK)
    stores = []
    for i in (0, 1):
        p = tmp_path / f"h{i}.img"
        with open(p, "wb") as f:
            f.truncate(store_bytes)
        stores.append(str(p))
    kw = dict(name=name, resource_id=name, disk=str(disk), hidden_stores=tuple(stores),
              listen_host="127.0.0.1", listen_port=10809, chunk_sectors=8, store_fill_warn=0.75,
              state_dir=str(tmp_path / "state"))
    kw.update(over)
    return SecondaryConfig(**kw)


@pytest.fixture
def sec(tmp_path, ctl):
    s = Secondary(make_cfg(tmp_path), ctl)
    try:
        yield s
    finally:
        s.down(force=True)


def read(path, off, length):
    return blockdev.read_at(path, off, length)


def assert_bytes(path, expected: list[tuple[int, int, bytes]]):
    """expected: (offset, length, byte value) ranges; compared 1 MiB at a time."""
    for off, length, value in expected:
        for pos in range(off, off + length, MiB):
            got = read(path, pos, MiB)
            if got != value * MiB:
                bad = next(i for i, b in enumerate(got) if b != value[0])
                raise AssertionError(f"{path} at byte {pos + bad}: {got[bad]:#04x}, expected {value[0]:#04x}")


def disk_of(sec):
    return loop.find(sec.cfg.disk)[0]


def test_up_then_active_reads_disk(sec):
    assert not os.path.exists(sec.active_path)
    state = sec.up()
    assert state.role == "secondary" and state.checkpoint == 0 and state.current_store == 0
    assert blockdev.size_bytes(sec.active_path) == DISK
    assert_bytes(sec.active_path, [(0, DISK, b"\x11")])
    with dm.Control() as c:
        uuids = {d.name: d.uuid for d in c.list_devices()}
    assert uuids == {"dmrepl-vm1-origin": "DMREPL-vm1-origin", "dmrepl-vm1-hidden": "DMREPL-vm1-hidden",
                     "dmrepl-vm1-active": "DMREPL-vm1-active"}


def test_checkpoint_scenarios_exact_bytes(sec):
    sec.up()
    S = disk_of(sec)
    # Primary writes 0x22 to [32M, 64M): active keeps the checkpoint, S has the new data.
    blockdev.write_at(sec.origin_path, 32 * MiB, b"\x22" * (32 * MiB))
    assert_bytes(sec.active_path, [(0, DISK, b"\x11")])
    assert_bytes(S, [(0, 32 * MiB, b"\x11"), (32 * MiB, 32 * MiB, b"\x22")])
    # Consumer writes 0x33 to active [0, 32M): active shows it, S does not.
    blockdev.write_at(sec.active_path, 0, b"\x33" * (32 * MiB))
    assert_bytes(sec.active_path, [(0, 32 * MiB, b"\x33"), (32 * MiB, 32 * MiB, b"\x11")])
    assert_bytes(S, [(0, 32 * MiB, b"\x11"), (32 * MiB, 32 * MiB, b"\x22")])
    # Checkpoint: active equals S exactly; the consumer's writes are dropped.
    state, pause = sec.checkpoint()
    assert state.checkpoint == 1 and state.current_store == 1 and pause > 0
    assert_bytes(sec.active_path, [(0, 32 * MiB, b"\x11"), (32 * MiB, 32 * MiB, b"\x22")])
    assert sec.store_health().allocated_bytes < MiB  # the new store starts empty
    # After the checkpoint, the first primary write to a chunk is copied again.
    blockdev.write_at(sec.origin_path, 40 * MiB, b"\x44" * MiB)
    assert_bytes(sec.active_path, [(0, 32 * MiB, b"\x11"), (32 * MiB, 32 * MiB, b"\x22")])
    assert_bytes(S, [(40 * MiB, MiB, b"\x44")])
    # A second checkpoint goes back to store 0, emptied by the first one.
    state, _ = sec.checkpoint()
    assert state.checkpoint == 2 and state.current_store == 0
    assert_bytes(sec.active_path, [(0, 32 * MiB, b"\x11"), (32 * MiB, 8 * MiB, b"\x22"),
                                   (40 * MiB, MiB, b"\x44"), (41 * MiB, 23 * MiB, b"\x22")])
    assert sec.state().checkpoint == 2  # persisted


def test_failover_rolls_back_primary_writes_and_keeps_consumer_writes(sec):
    sec.up()
    S = disk_of(sec)
    blockdev.write_at(sec.origin_path, 32 * MiB, b"\x22" * (32 * MiB))
    blockdev.write_at(sec.active_path, 0, b"\x33" * (32 * MiB))
    view = [(0, 32 * MiB, b"\x33"), (32 * MiB, 32 * MiB, b"\x11")]
    assert_bytes(sec.active_path, view)
    fenced = []
    # Hold the active device open across the switch, like a running consumer.
    fd = os.open(sec.active_path, os.O_RDWR)
    try:
        state = sec.failover(fence=lambda: fenced.append(True))
        assert fenced == [True] and state.role == "merging"
        assert not dm.Control().exists("dmrepl-vm1-hidden")
        # The view did not change by a byte, through the same open descriptor.
        for off, length, value in view:
            for pos in range(off, off + length, 4 * MiB):
                assert os.pread(fd, 4096, pos) == value * 4096
        assert_bytes(sec.active_path, view)
        # I/O goes on while the merge runs.
        blockdev.write_at(sec.active_path, 10 * MiB, b"\x55" * MiB)
    finally:
        os.close(fd)
    final = sec.wait_merge()
    assert final.role == "primary"
    with dm.Control() as c:
        assert [s.target_type for s in c.table("dmrepl-vm1-origin")] == ["linear"]
    expect = [(0, 10 * MiB, b"\x33"), (10 * MiB, MiB, b"\x55"), (11 * MiB, 21 * MiB, b"\x33"),
              (32 * MiB, 32 * MiB, b"\x11")]
    assert_bytes(sec.active_path, expect)
    assert_bytes(S, expect)


def test_failover_without_consumer_writes_and_checkpoint_refused_after(sec):
    sec.up()
    blockdev.write_at(sec.origin_path, 0, b"\x22" * MiB)
    sec.failover()
    with pytest.raises(DmreplError) as e:
        sec.checkpoint()
    assert "merging" in str(e.value)
    sec.wait_merge()
    assert_bytes(disk_of(sec), [(0, DISK, b"\x11")])
    with pytest.raises(DmreplError):
        sec.checkpoint()


def _power_loss(ctl):
    """Tear down every dm and loop device without any dmrepl cleanup."""
    dm.remove_tree(ctl, [d.name for d in ctl.list_devices()])
    for dev in loop.list_attached():
        loop.detach(dev)


def test_power_loss_then_up_restores_checkpoint_plus_consumer_writes(sec, ctl):
    sec.up()
    blockdev.write_at(sec.origin_path, 0, b"\x22" * (8 * MiB))
    sec.checkpoint()
    blockdev.write_at(sec.origin_path, 32 * MiB, b"\x66" * (16 * MiB))   # after checkpoint 1
    blockdev.write_at(sec.active_path, 4 * MiB, b"\x33" * (8 * MiB))     # consumer
    view = [(0, 4 * MiB, b"\x22"), (4 * MiB, 8 * MiB, b"\x33"), (12 * MiB, 52 * MiB, b"\x11")]
    assert_bytes(sec.active_path, view)
    _power_loss(ctl)
    assert not sec.is_up()
    state = sec.up()
    assert state.checkpoint == 1 and state.current_store == 1
    assert_bytes(sec.active_path, view)
    # And the stack works on: a checkpoint now shows S.
    sec.checkpoint()
    assert_bytes(sec.active_path, [(0, 8 * MiB, b"\x22"), (8 * MiB, 24 * MiB, b"\x11"),
                                   (32 * MiB, 16 * MiB, b"\x66"), (48 * MiB, 16 * MiB, b"\x11")])


def test_power_loss_during_merge_resumes_it(sec, ctl):
    sec.up()
    blockdev.write_at(sec.origin_path, 0, b"\x22" * (40 * MiB))
    blockdev.write_at(sec.active_path, 40 * MiB, b"\x33" * (4 * MiB))
    sec.failover()
    _power_loss(ctl)  # at once: the merge of 44 MiB is cut short
    state = sec.up()
    assert state.role == "merging"
    progress = sec.merge_progress()
    assert progress is not None
    final = sec.wait_merge()
    assert final.role == "primary"
    expect = [(0, 40 * MiB, b"\x11"), (40 * MiB, 4 * MiB, b"\x33"), (44 * MiB, 20 * MiB, b"\x11")]
    assert_bytes(sec.active_path, expect)
    assert_bytes(disk_of(sec), expect)


def test_power_loss_in_the_middle_of_a_slow_merge_resumes_it(tmp_path, ctl, loops):
    """S sits on dm-delay (writes held 10 ms) and the store holds 512 separate
    chunks, merged one run at a time: the power loss surely cuts the merge short."""
    import mmap

    from dmrepl.kernel.tables import Delay

    base = loops.make("s", DISK, fill=b"\x11")
    h0, h1 = loops.make("h0", 80 * MiB), loops.make("h1", 80 * MiB)
    sectors = DISK // 512

    def slow_disk():
        ctl.create("dmrepl-test-slow", dm.UUID_PREFIX + "test-slow")
        ctl.load("dmrepl-test-slow", [Delay(0, sectors, base, 0, 0, (base, 0, 10))])
        ctl.resume("dmrepl-test-slow")
        return "/dev/mapper/dmrepl-test-slow"

    cfg = make_cfg(tmp_path)
    cfg = cfg.__class__(**{**cfg.__dict__, "disk": slow_disk(), "hidden_stores": (h0, h1)})
    s = Secondary(cfg, ctl)
    # Consumer data in every other 4 KiB chunk of [0, 4M): 512 chunks that do not touch.
    pattern = (b"\x33" * 4096 + b"\x11" * 4096) * 512
    expect = pattern + b"\x11" * (DISK - len(pattern))
    try:
        s.up()
        fd = os.open(s.active_path, os.O_WRONLY | os.O_DIRECT)
        buf = mmap.mmap(-1, 4096)
        buf.write(b"\x33" * 4096)
        try:
            for i in range(512):
                os.pwritev(fd, [buf], i * 8192)
            os.fsync(fd)
        finally:
            os.close(fd)
            buf.close()
        s.failover()
        first = s.merge_progress()
        assert first.remaining_bytes > 0 and not first.done
        # Power loss: every dm device goes; the loop devices (the disks) stay.
        dm.remove_tree(ctl, [d.name for d in ctl.list_devices()])
        slow_disk()
        state = s.up()
        assert state.role == "merging"
        resumed = s.merge_progress()
        assert 0 < resumed.remaining_bytes and not resumed.done
        assert read(s.active_path, 0, DISK) == expect
        assert s.wait_merge().role == "primary"
        assert read(s.active_path, 0, DISK) == expect
        assert read(base, 0, DISK) == expect
    finally:
        s.down(force=True)
        if ctl.exists("dmrepl-test-slow"):
            ctl.remove("dmrepl-test-slow")


def test_store_overflow_is_reported_as_checkpoint_lost(tmp_path, ctl):
    s = Secondary(make_cfg(tmp_path, store_bytes=2 * MiB), ctl)
    try:
        s.up()
        blockdev.write_at(s.origin_path, 0, b"\x22" * (MiB + MiB // 2))
        state, health = s.watch_store()
        assert health.state == "valid"
        assert health.over_threshold and state.early_checkpoint_requested
        assert any("early checkpoint" in w for w in s.status()["warnings"])
        blockdev.write_at(s.origin_path, 8 * MiB, b"\x22" * (4 * MiB))   # more than the store holds
        state, health = s.watch_store()
        assert health.lost and state.checkpoint_lost
        assert any("CHECKPOINT LOST" in w for w in s.status()["warnings"])
        with pytest.raises(DmreplError) as e:
            s.failover()
        assert "resync" in e.value.hint
        # A checkpoint repairs it: the new store is valid and active equals S.
        state, _ = s.checkpoint()
        assert not state.checkpoint_lost and s.store_health().state == "valid"
        assert read(s.active_path, 8 * MiB, MiB) == b"\x22" * MiB
    finally:
        s.down(force=True)


# -- bad input: a clear error and nothing changed ------------------------------------

def _nothing_changed(ctl):
    assert ctl.list_devices() == []
    assert loop.list_attached() == {}


def test_already_up(sec, ctl):
    sec.up()
    with pytest.raises(DmreplError) as e:
        sec.up()
    assert "already up" in str(e.value)


def test_store_too_small(tmp_path, ctl):
    s = Secondary(make_cfg(tmp_path, store_bytes=512 * 1024), ctl)
    with pytest.raises(DmreplError) as e:
        s.up()
    assert "hidden store 0" in str(e.value) and "at least" in str(e.value)
    _nothing_changed(ctl)
    assert not s.states.exists()


def test_disk_and_store_of_different_kinds(tmp_path, ctl, loops):
    cfg = make_cfg(tmp_path)
    dev = loops.make("blk", 8 * MiB)
    s = Secondary(cfg.__class__(**{**cfg.__dict__, "hidden_stores": (dev, cfg.hidden_stores[1])}), ctl)
    with pytest.raises(DmreplError) as e:
        s.up()
    assert "one kind" in str(e.value)
    assert ctl.list_devices() == []


def test_missing_file(tmp_path, ctl):
    cfg = make_cfg(tmp_path)
    os.unlink(cfg.hidden_stores[1])
    with pytest.raises(DmreplError) as e:
        Secondary(cfg, ctl).up()
    assert "does not exist" in str(e.value) and cfg.hidden_stores[1] in str(e.value)
    _nothing_changed(ctl)


def test_store_in_use_by_a_loop_device(tmp_path, ctl):
    cfg = make_cfg(tmp_path)
    dev = loop.attach(cfg.hidden_stores[0])
    try:
        with pytest.raises(DmreplError) as e:
            Secondary(cfg, ctl).up()
        assert "in use" in str(e.value) and dev in str(e.value)
        assert ctl.list_devices() == []
    finally:
        loop.detach(dev)


def test_disk_open_by_another_process(tmp_path, ctl):
    import subprocess
    cfg = make_cfg(tmp_path)
    holder = subprocess.Popen(["sleep", "30"], stdin=open(cfg.disk, "rb"))
    try:
        with pytest.raises(DmreplError) as e:
            Secondary(cfg, ctl).up()
        assert "is open by sleep" in str(e.value)
        _nothing_changed(ctl)
    finally:
        holder.kill()
        holder.wait()


def test_block_device_store_busy(tmp_path, ctl, loops, devices):
    from dmrepl.kernel.tables import Linear
    disk = loops.make("d", 16 * MiB)
    h0 = loops.make("h0", 4 * MiB)
    h1 = loops.make("h1", 4 * MiB)
    devices.create("holder", [Linear(0, 8 * 1024, h1, 0)])  # h1 is held by a dm device
    cfg = make_cfg(tmp_path)
    s = Secondary(cfg.__class__(**{**cfg.__dict__, "disk": disk, "hidden_stores": (h0, h1)}), ctl)
    with pytest.raises(DmreplError) as e:
        s.up()
    assert "hidden store 1" in str(e.value) and "in use" in str(e.value)
    assert [d.name for d in ctl.list_devices()] == ["dmrepl-test-holder"]


def test_failover_and_checkpoint_when_not_running(tmp_path, ctl):
    s = Secondary(make_cfg(tmp_path), ctl)
    with pytest.raises(DmreplError) as e:
        s.failover()
    assert "never brought up" in str(e.value)
    s.up()
    s.down()
    for op in (s.failover, s.checkpoint):
        with pytest.raises(DmreplError) as e:
            op()
        assert "not up" in str(e.value)
    _nothing_changed(ctl)


def test_down_refuses_while_active_is_open_unless_forced(sec, ctl):
    sec.up()
    fd = os.open(sec.active_path, os.O_RDONLY)
    try:
        with pytest.raises(DmreplError) as e:
            sec.down()
        assert "open" in str(e.value) and "--force" in e.value.hint
        assert sec.is_up()
        done = sec.down(force=True)
        assert done[0].startswith("dmrepl-vm1-active: removal deferred until python")
        with pytest.raises(OSError) as e:
            os.pread(fd, 4096, 0)
        assert e.value.errno == errno.EIO
        # Until the holder closes it, the resource says so instead of looking up.
        assert ctl.info("dmrepl-vm1-active").deferred_remove
        assert not sec.is_up()
        assert [d["name"] for d in sec.status()["deferred_removal"]] == ["dmrepl-vm1-active"]
        with pytest.raises(DmreplError) as e:
            sec.up()
        assert "removal deferred" in str(e.value)
        assert sec.down()[0].startswith("dmrepl-vm1-active: removal deferred")
    finally:
        os.close(fd)
    # The kernel removes the device from a workqueue after the last close (dm.c: dm_blk_close).
    poll.wait_for(ctl.list_devices, "the deferred removal of dmrepl-vm1-active", ok=lambda v: v == [])
    assert loop.list_attached() == {}


def test_resource_id_mismatch_with_state(tmp_path, ctl):
    cfg = make_cfg(tmp_path)
    s = Secondary(cfg, ctl)
    s.up()
    s.down()
    other = Secondary(cfg.__class__(**{**cfg.__dict__, "resource_id": "someone-else"}), ctl)
    with pytest.raises(DmreplError) as e:
        other.up()
    assert "resource id" in str(e.value)
    _nothing_changed(ctl)
    assert st_mod.StateStore(cfg.resource_state_dir).load().resource_id == "vm1"
