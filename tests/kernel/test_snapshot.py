"""snapshot-origin + persistent snapshot: exact bytes in both views (kernel tier)."""

from dmrepl.kernel import blockdev
from dmrepl.kernel.status import SnapshotStatus

MiB = 1 << 20
SECTORS_PER_MiB = MiB // 512


def _status(ctl, name) -> SnapshotStatus:
    return SnapshotStatus.parse(ctl.status(name)[0].text)


def test_origin_and_snapshot_views(ctl, snapshot):
    disk, o, s, _cow, snap = snapshot

    empty = _status(ctl, snap)
    assert empty.valid and empty.total_sectors == 8 * SECTORS_PER_MiB
    assert empty.allocated_sectors == empty.metadata_sectors  # header + first exception area only

    # Origin write: the snapshot keeps the old data, the disk gets the new.
    blockdev.write_at(o, 0, b"\x22" * MiB)
    assert blockdev.read_at(s, 0, MiB) == b"\x11" * MiB
    assert blockdev.read_at(o, 0, MiB) == b"\x22" * MiB
    assert blockdev.read_at(disk, 0, MiB) == b"\x22" * MiB
    after_origin = _status(ctl, snap)
    # 1 MiB of copied chunks; metadata may grow by an exception area.
    assert after_origin.data_sectors - empty.data_sectors >= SECTORS_PER_MiB
    assert after_origin.allocated_sectors - empty.allocated_sectors <= SECTORS_PER_MiB + 16

    # A consumer write to the snapshot stays in the store, the disk is untouched ...
    blockdev.write_at(s, 4 * MiB, b"\x33" * MiB)
    assert blockdev.read_at(s, 4 * MiB, MiB) == b"\x33" * MiB
    assert blockdev.read_at(disk, 4 * MiB, MiB) == b"\x11" * MiB
    # ... and survives a later origin write to the same range.
    blockdev.write_at(o, 4 * MiB, b"\x44" * MiB)
    assert blockdev.read_at(s, 4 * MiB, MiB) == b"\x33" * MiB
    assert blockdev.read_at(disk, 4 * MiB, MiB) == b"\x44" * MiB
    assert _status(ctl, snap).data_sectors - empty.data_sectors >= 2 * SECTORS_PER_MiB

    # Untouched ranges read the same in both views.
    assert blockdev.read_at(s, 10 * MiB, MiB) == b"\x11" * MiB
    assert blockdev.read_at(o, 10 * MiB, MiB) == b"\x11" * MiB

    # A second origin write to an already copied chunk copies nothing more.
    before = _status(ctl, snap).allocated_sectors
    blockdev.write_at(o, 0, b"\x55" * MiB)
    assert _status(ctl, snap).allocated_sectors == before
    assert blockdev.read_at(s, 0, MiB) == b"\x11" * MiB
