"""Table and status lines: format/parse round trips (unit tier, no kernel)."""

import pytest

from dmrepl.kernel.status import EraStatus, MirrorStatus, SnapshotStatus
from dmrepl.kernel.tables import (
    Delay,
    Era,
    Error,
    Flakey,
    Linear,
    Mirror,
    Snapshot,
    SnapshotMerge,
    SnapshotOrigin,
    TableError,
    format_table,
    parse_line,
    parse_table,
)

TARGETS = [
    (Linear(0, 2048, "/dev/loop0", 64), "0 2048 linear /dev/loop0 64"),
    (Error(10, 20), "10 20 error "),
    (SnapshotOrigin(0, 131072, "7:1"), "0 131072 snapshot-origin 7:1"),
    (Snapshot(0, 131072, "7:1", "7:2", "P", 8), "0 131072 snapshot 7:1 7:2 P 8"),
    (Snapshot(0, 131072, "7:1", "7:2", "N", 16), "0 131072 snapshot 7:1 7:2 N 16"),
    (SnapshotMerge(0, 131072, "7:1", "7:2", "P", 8), "0 131072 snapshot-merge 7:1 7:2 P 8"),
    (Era(0, 131072, "7:3", "7:4", 2048), "0 131072 era 7:3 7:4 2048"),
    (Mirror(0, 32768, "core", ("1024",), (("7:2", 0), ("43:0", 0))),
     "0 32768 mirror core 1 1024 2 7:2 0 43:0 0"),
    (Mirror(0, 32768, "core", ("1024", "nosync"), (("7:2", 0), ("43:0", 8)), ("1", "handle_errors")),
     "0 32768 mirror core 2 1024 nosync 2 7:2 0 43:0 8 2 1 handle_errors"),
    (Flakey(0, 100, "7:5", 0, 5, 1), "0 100 flakey 7:5 0 5 1"),
    (Flakey(0, 100, "7:5", 0, 5, 1, ("drop_writes",)), "0 100 flakey 7:5 0 5 1 1 drop_writes"),
    (Delay(0, 100, "7:6", 0, 50), "0 100 delay 7:6 0 50"),
    (Delay(0, 100, "7:6", 0, 0, ("7:6", 0, 200)), "0 100 delay 7:6 0 0 7:6 0 200"),
]


@pytest.mark.parametrize("target,line", TARGETS, ids=[t.target_type + str(i) for i, (t, _) in enumerate(TARGETS)])
def test_format_and_parse_round_trip(target, line):
    assert target.line() == line
    assert parse_line(line) == target
    assert parse_line(target.line()) == target


def test_multi_line_table():
    table = [Linear(0, 100, "7:0", 0), Linear(100, 50, "7:1", 0)]
    assert parse_table(format_table(table) + "\n") == table


@pytest.mark.parametrize("line,message", [
    ("0 100", "expected"),
    ("x 100 linear 7:0 0", "start sector"),
    ("0 -5 linear 7:0 0", "must not be negative"),
    ("0 100 linear 7:0", "linear"),
    ("0 100 bogus a b", "unknown target type"),
    ("0 100 snapshot 7:1 7:2 Q 8", "persistence"),
    ("0 100 snapshot 7:1 7:2 P 12", "power of two"),
    ("0 100 snapshot-merge 7:1 7:2 N 8", "persistent"),
    ("0 100 mirror core 1 1024 2 7:2 0", "mirror"),
    ("0 100 mirror core 1 1024 1 7:2 0 3 a b", "features"),
])
def test_bad_lines_raise_table_error(line, message):
    with pytest.raises(TableError) as e:
        parse_line(line)
    assert message in str(e.value)


@pytest.mark.parametrize("text,expected", [
    ("16/2048 16", SnapshotStatus("valid", 16, 2048, 16)),
    ("1040/204800 24", SnapshotStatus("valid", 1040, 204800, 24)),
    ("Invalid", SnapshotStatus("invalid")),
    ("Overflow", SnapshotStatus("overflow")),
    ("Merge failed", SnapshotStatus("merge_failed")),
    ("Unknown", SnapshotStatus("unknown")),
])
def test_snapshot_status(text, expected):
    st = SnapshotStatus.parse(text)
    assert st == expected
    assert st.format() == text


def test_snapshot_status_figures():
    st = SnapshotStatus.parse("1040/2048 16")
    assert st.data_sectors == 1024
    assert st.fill_fraction == pytest.approx(1040 / 2048)
    assert not st.merge_done
    assert SnapshotStatus.parse("16/2048 16").merge_done
    assert not SnapshotStatus.parse("Invalid").merge_done
    with pytest.raises(TableError):
        SnapshotStatus.parse("12 13 14")


def test_era_status():
    st = EraStatus.parse("8 10/1024 3 45")
    assert st == EraStatus(8, 10, 1024, 3, 45)
    assert st.format() == "8 10/1024 3 45"
    assert EraStatus.parse("8 10/1024 1 -").held_root is None
    with pytest.raises(TableError):
        EraStatus.parse("8 10 1")


def test_mirror_status():
    text = "2 7:2 43:0 30/32 1 AD 1 core"
    st = MirrorStatus.parse(text)
    assert st.devices == ("7:2", "43:0")
    assert (st.in_sync_regions, st.total_regions) == (30, 32)
    assert st.health == "AD" and not st.in_sync
    assert not st.leg_failed(0) and st.leg_failed(1)
    assert st.format() == text
    with pytest.raises(TableError):
        MirrorStatus.parse("2 7:2 30/32 1 AD 1 core")
