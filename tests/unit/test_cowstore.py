"""dm-snapshot persistent COW store: the exception table from synthetic store files (unit tier, no kernel)."""

import struct

import pytest

from dmrepl.kernel import cowstore

CHUNK_SECTORS = 8
CHUNK_BYTES = CHUNK_SECTORS * 512
PER_AREA = CHUNK_BYTES // 16  # 256 entries an area


def _store(tmp_path, entries, *, magic=cowstore.MAGIC, valid=1, version=1, chunk_sectors=CHUNK_SECTORS,
           areas=None, name="cow.img") -> str:
    """A store laid out as dm-snap-persistent.c writes it: header, then areas of PER_AREA entries,
    each followed by its data chunks (left zero here); `areas` pads the file to hold that many."""
    chunk_bytes = chunk_sectors * 512
    per_area = chunk_bytes // 16
    n_areas = areas if areas is not None else len(entries) // per_area + 1
    data = bytearray(cowstore.area_chunk(n_areas, per_area) * chunk_bytes)
    struct.pack_into("<IIII", data, 0, magic, valid, version, chunk_sectors)
    for i, (old, new) in enumerate(entries):
        area, index = divmod(i, per_area)
        struct.pack_into("<QQ", data, cowstore.area_chunk(area, per_area) * chunk_bytes + 16 * index, old, new)
    path = tmp_path / name
    path.write_bytes(bytes(data))
    return str(path)


def _data_chunks(n):
    """The store chunks the kernel hands out in order: 2, 3, ... skipping each metadata area."""
    out, c = [], 2
    while len(out) < n:
        if (c - 1) % (PER_AREA + 1) != 0:
            out.append(c)
        c += 1
    return out


def test_empty_table(tmp_path):
    assert cowstore.read(_store(tmp_path, [])) == cowstore.CowTable(CHUNK_SECTORS, frozenset())
    assert cowstore.CowTable(CHUNK_SECTORS, frozenset()).extents_bytes() == []


def test_table_ends_at_first_zero_new_chunk(tmp_path):
    entries = [(5, 2), (6, 3), (0, 4), (100, 5)]
    path = _store(tmp_path, entries + [(0, 0), (7, 6)])  # an entry after the end is not read
    table = cowstore.read(path)
    assert table == cowstore.CowTable(CHUNK_SECTORS, frozenset({0, 5, 6, 100}))
    assert table.extents_bytes() == [(0, CHUNK_BYTES), (5 * CHUNK_BYTES, 2 * CHUNK_BYTES),
                                     (100 * CHUNK_BYTES, CHUNK_BYTES)]


def test_merged_entries_are_cleared_from_the_end(tmp_path):
    # persistent_commit_merge writes old = new = 0 over the last entries.
    path = _store(tmp_path, [(9, 2), (0, 0), (0, 0)])
    assert cowstore.read(path).chunks == frozenset({9})


def test_table_spanning_two_areas(tmp_path):
    n = PER_AREA + 3
    olds = [1000 + 2 * i for i in range(n)]
    path = _store(tmp_path, list(zip(olds, _data_chunks(n))))
    table = cowstore.read(path)
    assert table.chunks == frozenset(olds)
    assert len(table.extents_bytes()) == n


def test_full_area_then_zeroed_area(tmp_path):
    # Exactly one full area: the kernel zeroed the next one before committing the last entry.
    path = _store(tmp_path, list(zip(range(PER_AREA), _data_chunks(PER_AREA))), areas=2)
    table = cowstore.read(path)
    assert table.chunks == frozenset(range(PER_AREA))
    assert table.extents_bytes() == [(0, PER_AREA * CHUNK_BYTES)]


def test_store_ending_inside_the_metadata_is_an_error(tmp_path):
    path = _store(tmp_path, list(zip(range(PER_AREA), _data_chunks(PER_AREA))), areas=1)
    with pytest.raises(cowstore.CowStoreError, match="ends inside metadata area 1"):
        cowstore.read(path)


def test_other_chunk_size_from_the_header(tmp_path):
    path = _store(tmp_path, [(3, 2), (4, 3)], chunk_sectors=32)
    table = cowstore.read(path)
    assert table == cowstore.CowTable(32, frozenset({3, 4}))
    assert table.extents_bytes() == [(3 * 16384, 2 * 16384)]


def test_zeroed_header_is_none(tmp_path):
    path = tmp_path / "zero.img"
    path.write_bytes(bytes(3 * CHUNK_BYTES))
    assert cowstore.read(str(path)) is None


def test_wrong_magic(tmp_path):
    with pytest.raises(cowstore.CowStoreError, match=r"magic 0x4d695272, not a persistent COW store"):
        cowstore.read(_store(tmp_path, [(1, 2)], magic=0x4D695272))


def test_wrong_version(tmp_path):
    with pytest.raises(cowstore.CowStoreError, match="version 2, expected 1"):
        cowstore.read(_store(tmp_path, [(1, 2)], version=2))


def test_invalidated_snapshot(tmp_path):
    with pytest.raises(cowstore.InvalidatedError, match="invalidated"):
        cowstore.read(_store(tmp_path, [(1, 2)], valid=0))


def test_bad_chunk_size(tmp_path):
    path = _store(tmp_path, [], chunk_sectors=8)
    with open(path, "r+b") as f:
        f.seek(12)
        f.write(struct.pack("<I", 12))
    with pytest.raises(cowstore.CowStoreError, match="chunk size 12 sectors"):
        cowstore.read(path)


def test_short_file(tmp_path):
    path = tmp_path / "short.img"
    path.write_bytes(b"SnAp")
    with pytest.raises(cowstore.CowStoreError, match="shorter than a COW store header"):
        cowstore.read(str(path))
