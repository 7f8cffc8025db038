"""dm-era: writes in era N are reported by era_invalidate --written-since N (kernel tier)."""

from dmrepl.kernel import blockdev, era
from dmrepl.kernel.tables import Era

MiB = 1 << 20
SECTORS_PER_MiB = MiB // 512
BLOCK_SECTORS = 128  # 64 KiB era blocks
BLOCK_BYTES = BLOCK_SECTORS * 512


def test_written_since_reports_exact_block_ranges(ctl, loops, devices):
    meta = loops.make("meta", 4 * MiB)
    disk = loops.make("disk", 64 * MiB)
    name = devices.create("era", [Era(0, 64 * SECTORS_PER_MiB, meta, disk, BLOCK_SECTORS)])
    dev = f"/dev/mapper/{name}"
    first = era.status(ctl, name).current_era

    blockdev.write_at(dev, 0, b"a" * 4096)                            # block 0
    e2 = era.checkpoint(ctl, name)
    assert e2 == first + 1
    blockdev.write_at(dev, 16 * BLOCK_BYTES, b"b" * (2 * BLOCK_BYTES))  # blocks 16, 17
    blockdev.write_at(dev, 160 * BLOCK_BYTES + 512, b"c" * 512)         # block 160
    e3 = era.checkpoint(ctl, name)
    blockdev.write_at(dev, 500 * BLOCK_BYTES - 512, b"d" * 1024)        # blocks 499, 500

    assert era.written_since(ctl, name, meta, e3) == [(499, 501)]
    assert era.written_since(ctl, name, meta, e2) == [(16, 18), (160, 161), (499, 501)]
    assert era.written_since(ctl, name, meta, first) == [(0, 1), (16, 18), (160, 161), (499, 501)]
    # The metadata snapshot was dropped each time: the status holds no root.
    assert era.status(ctl, name).held_root is None
    # Data passes through untouched.
    assert blockdev.read_at(disk, 16 * BLOCK_BYTES, 2 * BLOCK_BYTES) == b"b" * (2 * BLOCK_BYTES)


def test_suspend_resume_advances_the_era(ctl, loops, devices):
    meta = loops.make("meta", 4 * MiB)
    disk = loops.make("disk", 16 * MiB)
    name = devices.create("era", [Era(0, 16 * SECTORS_PER_MiB, meta, disk, BLOCK_SECTORS)])
    before = era.status(ctl, name).current_era
    ctl.suspend(name)
    ctl.resume(name)
    assert era.status(ctl, name).current_era == before + 1


def _metadata_as_a_crash_leaves_it(meta: str, loops) -> str:
    """The metadata device's bytes now (O_DIRECT), on a device of their own: what a power loss
    would leave (era_invalidate opens with O_DIRECT: a block device, not a tmpfs file)."""
    copy = loops.make("crash", blockdev.size_bytes(meta))
    blockdev.write_at(copy, 0, blockdev.read_at(meta, 0, blockdev.size_bytes(meta)))
    return copy


def test_offline_history_after_a_removal_and_after_a_crash(ctl, loops, devices):
    """What `resolve --discard-my-data` reads offline.  After a removal (the stack's `down`) every
    era is there.  After a crash (the metadata as it is on disk while the device is live) the era
    current at the crash is missing, though its writeset is on disk: settle() -- an era device
    loaded over the metadata and removed -- archives it, and it is there again."""
    meta = loops.make("meta", 4 * MiB)
    disk = loops.make("disk", 16 * MiB)
    name = devices.create("era", [Era(0, 16 * SECTORS_PER_MiB, meta, disk, BLOCK_SECTORS)])
    dev = f"/dev/mapper/{name}"
    first = era.status(ctl, name).current_era
    blockdev.write_at(dev, 0, b"a" * 4096)                             # block 0, era `first`
    second = era.checkpoint(ctl, name)
    blockdev.write_at(dev, 5 * BLOCK_BYTES, b"b" * 4096)               # block 5, the current era
    crash = _metadata_as_a_crash_leaves_it(meta, loops)
    assert era.written_since_offline(crash, first) == [(0, 1)]      # block 5 missing
    assert era.written_since_offline(crash, second) == []
    ctl.remove(name)
    devices.names.remove(name)
    assert era.written_since_offline(meta, first) == [(0, 1), (5, 6)]
    assert era.written_since_offline(meta, second) == [(5, 6)]
    era.settle(ctl, "dmrepl-test-era-settle", "DMREPL-test-era-settle", crash, loops.make("disk2", 16 * MiB),
               BLOCK_SECTORS)
    assert not ctl.exists("dmrepl-test-era-settle")
    assert era.written_since_offline(crash, first) == [(0, 1), (5, 6)]
    assert era.written_since_offline(crash, second) == [(5, 6)]
