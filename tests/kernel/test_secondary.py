"""The secondary stack: acceptance scenarios with exact bytes (kernel tier).

They follow QEMU's tests/unit/test-replication.c, with the true values that its
`memcmp <= 0` checks hide.  S is 64 MiB of 0x11; a "primary write" is a write
to the origin device (what the NBD server does); a "consumer write" is a write
to the active device.
"""

import errno
import os

import pytest
import sweep

from dmrepl import cli, poll
from dmrepl import state as st_mod
from dmrepl.cli.secondary import warnings
from dmrepl.config import SecondaryConfig
from dmrepl.errors import DmreplError
from dmrepl.kernel import blockdev, dm, loop
from dmrepl.names import UUID_PREFIX
from dmrepl.roles.secondary import Secondary

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
    assert state.checkpoint == 1 and state.current_store == 1 and 0 < pause < 5
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


@pytest.mark.parametrize("committed", [False, True])
def test_a_checkpoint_switch_cut_between_suspend_and_resume_is_finished_by_the_state(sec, committed):
    """What a secondary daemon killed inside a checkpoint leaves: active, hidden and origin
    suspended, hidden's next table loaded, the state saved or not.  The next `up` of the daemon
    (finish_interrupted_switch) makes the state's checkpoint live: the view is the old one if the
    commit was not reached, the disk's if it was; and a new checkpoint works after."""
    st = sec.up()
    blockdev.write_at(sec.origin_path, 0, b"\x22" * MiB)          # the primary writes after checkpoint 0
    names = {p: sec.stack.dm(p) for p in ("active", "hidden", "origin")}
    b = sec.stack.backing()
    sec.stack.zero_header(b.stores[1])
    for part in ("active", "hidden", "origin"):
        sec.ctl.suspend(names[part])
    sec.ctl.load(names["hidden"], sec.stack.hidden_table(b, 1))
    if committed:
        sec.states.save(st.evolve(checkpoint=1, current_store=1))
    done = sec.finish_interrupted_switch()
    assert not any(sec.ctl.info(n).suspended or sec.ctl.info(n).inactive_table for n in names.values()), done
    assert done[-3:] == [f"{names['hidden']} resumed", f"{names['origin']} resumed", f"{names['active']} resumed"]
    view = b"\x22" if committed else b"\x11"
    assert_bytes(sec.active_path, [(0, MiB, view), (MiB, DISK - MiB, b"\x11")])
    assert sec.finish_interrupted_switch() == []                      # nothing left to finish
    state, _ = sec.checkpoint()
    assert state.checkpoint == (2 if committed else 1)
    assert_bytes(sec.active_path, [(0, MiB, b"\x22"), (MiB, DISK - MiB, b"\x11")])


def _grow_disk(sec, size: int, fill: bytes) -> None:
    with open(sec.cfg.disk, "r+b") as f:
        f.seek(DISK)
        f.write(fill * (size - DISK))


def test_a_grow_keeps_the_checkpoint_view_and_covers_the_new_range_then_shrinks_back(sec):
    """resize's secondary half (roles/secondary/grow.py): the view keeps checkpoint 0's bytes in
    the old range, a primary write into the new range is copied into the store first (the
    standby view keeps the grown disk's bytes there), the state records the size and the new range;
    shrink_back puts the old size back.  A disk not grown to the asked size is refused."""
    sec.up()
    blockdev.write_at(sec.origin_path, 0, b"\x22" * MiB)            # the primary's write after checkpoint 0
    with pytest.raises(DmreplError, match="the primary's new size"):
        sec.grow(DISK + 16 * MiB)
    assert blockdev.size_bytes(sec.origin_path) == DISK and sec.state().size_bytes == DISK
    _grow_disk(sec, DISK + 16 * MiB, b"\x33")
    st = sec.grow(DISK + 16 * MiB)
    assert st.size_bytes == DISK + 16 * MiB and sec.state().size_bytes == DISK + 16 * MiB
    assert st.diverged == {"checkpoint": 0, "ranges": [[DISK, 16 * MiB]], "grown_from": DISK}
    for path in (sec.origin_path, sec.active_path):
        assert blockdev.size_bytes(path) == DISK + 16 * MiB
    assert_bytes(sec.active_path, [(0, DISK, b"\x11"), (DISK, 16 * MiB, b"\x33")])
    blockdev.write_at(sec.origin_path, DISK + MiB, b"\x44" * MiB)    # the primary writes into the new range
    assert_bytes(sec.active_path, [(0, DISK, b"\x11"), (DISK, 16 * MiB, b"\x33")])
    assert sec.grow(DISK + 16 * MiB) == sec.state()                  # asked again: nothing to do
    with pytest.raises(DmreplError, match="shrinking"):
        sec.grow(DISK)
    st = sec.shrink_back()
    assert (st.size_bytes, st.diverged) == (DISK, None)
    assert blockdev.size_bytes(sec.origin_path) == DISK and blockdev.size_bytes(sec.active_path) == DISK
    assert_bytes(sec.active_path, [(0, DISK, b"\x11")])
    sec.down()
    assert sec.up().size_bytes == DISK                                # the state's size, not the disk's
    assert blockdev.size_bytes(sec.origin_path) == DISK


@pytest.mark.parametrize("committed", [False, True])
def test_a_grow_switch_cut_between_suspend_and_resume_is_finished_at_the_state_size(sec, committed):
    """A daemon killed inside a resize's switch: the three tables loaded at the new size, all
    suspended, the state saved or not.  finish_interrupted_switch makes the state's size live on
    all three (never hidden shorter than origin)."""
    st = sec.up()
    new = DISK + 16 * MiB
    _grow_disk(sec, new, b"\x33")
    b = sec.stack.backing()
    loop.set_capacity(b.disk)
    names = {p: sec.stack.dm(p) for p in ("active", "hidden", "origin")}
    for part in ("active", "hidden", "origin"):
        sec.ctl.suspend(names[part])
    from dmrepl.kernel.tables import SnapshotOrigin
    sec.ctl.load(names["hidden"], sec.stack.hidden_table(b, st.current_store, new // 512))
    sec.ctl.load(names["origin"], [SnapshotOrigin(0, new // 512, b.disk)])
    sec.ctl.load(names["active"], sec.stack.over("hidden", b, new // 512))
    if committed:
        sec.states.save(st.evolve(size_bytes=new, diverged={"checkpoint": 0, "ranges": [[DISK, new - DISK]],
                                                            "grown_from": DISK}))
    done = sec.finish_interrupted_switch()
    assert not any(sec.ctl.info(n).suspended or sec.ctl.info(n).inactive_table for n in names.values()), done
    size = new if committed else DISK
    for part in ("hidden", "origin", "active"):
        assert sec.ctl.table(names[part])[0].length == size // 512, (part, done)
    blockdev.write_at(sec.origin_path, 0, b"\x22" * MiB)
    assert_bytes(sec.active_path, [(0, DISK, b"\x11")] + ([(DISK, new - DISK, b"\x33")] if committed else []))
    assert sec.finish_interrupted_switch() == []


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


def test_power_loss_then_up_restores_checkpoint_plus_consumer_writes(sec, ctl, run_dir):
    sec.up()
    blockdev.write_at(sec.origin_path, 0, b"\x22" * (8 * MiB))
    sec.checkpoint()
    blockdev.write_at(sec.origin_path, 32 * MiB, b"\x66" * (16 * MiB))   # after checkpoint 1
    blockdev.write_at(sec.active_path, 4 * MiB, b"\x33" * (8 * MiB))     # consumer
    view = [(0, 4 * MiB, b"\x22"), (4 * MiB, 8 * MiB, b"\x33"), (12 * MiB, 52 * MiB, b"\x11")]
    assert_bytes(sec.active_path, view)
    sweep.power_loss(ctl, "vm1", run_dir)
    assert not sec.is_up()
    state = sec.up()
    assert state.checkpoint == 1 and state.current_store == 1
    assert_bytes(sec.active_path, view)
    # And the stack works on: a checkpoint now shows S.
    sec.checkpoint()
    assert_bytes(sec.active_path, [(0, 8 * MiB, b"\x22"), (8 * MiB, 24 * MiB, b"\x11"),
                                   (32 * MiB, 16 * MiB, b"\x66"), (48 * MiB, 16 * MiB, b"\x11")])


def test_power_loss_in_the_middle_of_a_slow_merge_resumes_it(tmp_path, ctl, loops):
    """S sits on dm-delay (writes held 10 ms) and the store holds 512 separate
    chunks, merged one run at a time (5 s at least): the power loss surely cuts the merge short,
    and the test checks that it did.  The merge must roll back the primary's
    post-checkpoint writes and keep the consumer's, across the power loss."""
    import mmap

    from dmrepl.kernel.tables import Delay

    base = loops.make("s", DISK, fill=b"\x11")
    h0, h1 = loops.make("h0", 80 * MiB), loops.make("h1", 80 * MiB)
    sectors = DISK // 512

    def slow_disk():
        ctl.create("dmrepl-test-slow", UUID_PREFIX + "test-slow")
        ctl.load("dmrepl-test-slow", [Delay(0, sectors, base, 0, 0, (base, 0, 10))])
        ctl.resume("dmrepl-test-slow")
        return "/dev/mapper/dmrepl-test-slow"

    cfg = make_cfg(tmp_path)
    cfg = cfg.__class__(**{**cfg.__dict__, "disk": slow_disk(), "hidden_stores": (h0, h1)})
    s = Secondary(cfg, ctl)
    # In [0, 4M), chunk by chunk: the consumer writes 0x33 to even 4 KiB chunks,
    # the primary 0x22 to odd ones.  No two touch; after the merge the odd ones
    # are back at the checkpoint (0x11).
    expect = (b"\x33" * 4096 + b"\x11" * 4096) * 512 + b"\x11" * (DISK - 4 * MiB)

    def write_every_other(path, first, value):
        fd = os.open(path, os.O_WRONLY | os.O_DIRECT)
        buf = mmap.mmap(-1, 4096)
        buf.write(value * 4096)
        try:
            for i in range(first, 1024, 2):
                os.pwritev(fd, [buf], i * 4096)
            os.fsync(fd)
        finally:
            os.close(fd)
            buf.close()

    try:
        s.up()
        write_every_other(s.active_path, 0, b"\x33")
        write_every_other(s.origin_path, 1, b"\x22")
        s.failover()
        first = s.merge_progress()
        assert first.remaining_bytes > 0 and not first.done
        # Power loss: every dm device goes (the delay device too); the loop devices (the disks) stay.
        sweep.power_loss(ctl)
        slow_disk()
        state = s.up()
        assert state.role == "merging"
        resumed = s.merge_progress()
        assert 0 < resumed.remaining_bytes and not resumed.done, "the merge was not cut short"
        assert read(s.active_path, 0, DISK) == expect
        assert s.wait_merge().role == "primary"
        assert read(s.active_path, 0, DISK) == expect
        assert read(base, 0, DISK) == expect
    finally:
        s.down(force=True)
        if ctl.exists("dmrepl-test-slow"):
            ctl.remove("dmrepl-test-slow")


def _config_file(cfg: SecondaryConfig, tmp_path) -> str:
    path = tmp_path / f"{cfg.name}.toml"
    path.write_text(f'name = "{cfg.name}"\nresource_id = "{cfg.resource_id}"\nstate_dir = "{cfg.state_dir}"\n'
                    f'[secondary]\ndisk = "{cfg.disk}"\nhidden_stores = ["{cfg.hidden_stores[0]}", '
                    f'"{cfg.hidden_stores[1]}"]\nlisten = "127.0.0.1:{cfg.listen_port}"\n')
    return str(path)


def test_store_overflow_is_reported_as_checkpoint_lost(tmp_path, ctl, capsys):
    s = Secondary(make_cfg(tmp_path, store_bytes=2 * MiB), ctl)
    config = _config_file(s.cfg, tmp_path)
    try:
        s.up()
        blockdev.write_at(s.origin_path, 0, b"\x22" * (MiB + MiB // 2))
        state, health = s.watch_store()
        assert health.state == "valid"
        assert health.over_threshold and state.early_checkpoint_requested
        assert any("early checkpoint" in w for w in warnings(s.status(), s.cfg))
        blockdev.write_at(s.origin_path, 8 * MiB, b"\x22" * (4 * MiB))   # more than the store holds
        state, health = s.watch_store()
        assert health.lost and state.checkpoint_lost
        assert any("CHECKPOINT LOST" in w for w in warnings(s.status(), s.cfg))
        # The status says what happened, not "0 B of 0 B" (an invalid store reports no fill level).
        assert cli.main(["secondary", "status", "vm1", "--config", config]) == 0
        text = capsys.readouterr().out
        assert "store   INVALID: the kernel dropped the hidden store" in text and "0 B of 0 B" not in text
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
        assert [d.name for d in sec.status().deferred] == ["dmrepl-vm1-active"]
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


def test_disk_file_renamed_under_a_running_stack(sec, ctl, tmp_path):
    """The config's path no longer names the loop device's file: a clear error (not an IndexError),
    and `down` still finds the loop devices by the numbers its tables use."""
    sec.up()
    moved = str(tmp_path / "moved.img")
    os.rename(sec.cfg.disk, moved)
    try:
        with pytest.raises(DmreplError) as e:
            sec.checkpoint()
        assert str(e.value) == f"disk {sec.cfg.disk} is gone (moved or deleted under the running stack of vm1)"
        assert "down vm1 --force" in e.value.hint
        assert sec.state().checkpoint == 0
        done = sec.down(force=True)
        assert any(d.startswith("/dev/loop") for d in done)
        assert ctl.list_devices() == [] and loop.find(moved) == []
    finally:
        os.rename(moved, sec.cfg.disk)
