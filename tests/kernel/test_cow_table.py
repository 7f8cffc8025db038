"""A persistent snapshot's exception table read from its COW store by cowstore.read (kernel tier)."""

from dmrepl.kernel import blockdev, cowstore

CHUNK_SECTORS = 8            # the snapshot fixture's (conftest.py)
CHUNK = CHUNK_SECTORS * 512  # 4 KiB; 256 exceptions a metadata area


def _read_suspended(ctl, name, cow):
    ctl.suspend(name)
    try:
        return cowstore.read(cow)
    finally:
        ctl.resume(name)


def test_table_holds_origin_and_snapshot_writes(ctl, snapshot):
    _disk, o, s, cow, snap = snapshot
    # The table load wrote the header and zeroed the first area (persistent_read_metadata).
    assert _read_suspended(ctl, snap, cow) == cowstore.CowTable(CHUNK_SECTORS, frozenset())

    blockdev.write_at(o, 0, b"\x22" * 3 * CHUNK)                     # origin chunks 0-2
    blockdev.write_at(o, 100 * CHUNK + 512, b"\x22" * 512)           # a partial origin chunk
    blockdev.write_at(s, 50 * CHUNK, b"\x33" * CHUNK)                # a whole snapshot chunk
    blockdev.write_at(s, 300 * CHUNK + 1024, b"\x33" * 512)          # a partial snapshot chunk
    blockdev.write_at(s, 1 * CHUNK, b"\x33" * CHUNK)                 # already copied: no new entry
    blockdev.write_at(o, 2048 * CHUNK, b"\x44" * 300 * CHUNK)        # 300 more: a second area
    want = {0, 1, 2, 100, 50, 300} | set(range(2048, 2348))

    # Each write returned after the kernel had written its area (REQ_PREFLUSH | REQ_FUA):
    # the table is already on the store, suspended or not.
    assert cowstore.read(cow).chunks == want
    table = _read_suspended(ctl, snap, cow)
    assert table == cowstore.CowTable(CHUNK_SECTORS, frozenset(want))
    assert table.extents_bytes() == [(0, 3 * CHUNK), (50 * CHUNK, CHUNK), (100 * CHUNK, CHUNK),
                                     (300 * CHUNK, CHUNK), (2048 * CHUNK, 300 * CHUNK)]
    assert blockdev.read_at(s, 0, 3 * CHUNK) == b"\x11" * CHUNK + b"\x33" * CHUNK + b"\x11" * CHUNK


def test_origin_writes_reach_a_suspended_snapshot_store(ctl, snapshot):
    """Suspending the snapshot alone does not freeze its table: snapshot-origin still copies
    (dm-snap.c: __origin_write checks only the snapshot's valid and active flags)."""
    _disk, o, s, cow, snap = snapshot
    ctl.suspend(snap)
    try:
        blockdev.write_at(o, 7 * CHUNK, b"\x22" * CHUNK)
        assert cowstore.read(cow).chunks == {7}
    finally:
        ctl.resume(snap)
    assert blockdev.read_at(s, 7 * CHUNK, CHUNK) == b"\x11" * CHUNK
