"""What a delta resync copies: the mirror log's on-disk bitmap, era blocks to pieces, coarsening (unit tier)."""

import struct

import pytest

from dmrepl.kernel import mirrorlog
from dmrepl.kernel.mirrorlog import Bitmap, LogFormatError
from dmrepl.ranges import merge
from dmrepl.roles.hello import Hello
from dmrepl.roles.primary import resync

GiB = 1 << 30


def test_the_bitmap_has_the_kernels_layout():
    data = Bitmap.with_zeros(40, [0, 9, 39]).encode()
    assert struct.unpack_from("<IIQ", data) == (0x4D695272, 2, 40)
    assert len(data) == 4096                                  # 1 KiB header + 8 bytes, rounded to the block
    bits = data[1024:1032]
    assert bits[0] == 0xFE and bits[1] == 0xFD and bits[4] == 0x7F   # regions 0, 9 and 39 are zero
    assert bits[2] == bits[3] == 0xFF and bits[5:8] == b"\xff\xff\xff"
    assert Bitmap.decode(data) == Bitmap(40, frozenset({0, 9, 39}))


def test_a_bitmap_read_back_ignores_pad_bits_and_refuses_garbage():
    data = bytearray(Bitmap.with_zeros(40, []).encode())
    data[1024 + 5] = 0                                        # pad bits past region 39: the kernel clears them
    assert Bitmap.decode(bytes(data)).all_in_sync
    with pytest.raises(LogFormatError, match="magic"):
        Bitmap.decode(b"\0" * 4096)
    with pytest.raises(LogFormatError, match="version 3"):
        Bitmap.decode(struct.pack("<IIQ", 0x4D695272, 3, 40).ljust(4096, b"\0"))
    with pytest.raises(ValueError, match="outside"):
        Bitmap.with_zeros(40, [40])
    assert mirrorlog.device_bytes(1 << 18) == 1024 + (1 << 15) + 3072   # 1 GiB of 4 KiB regions: 36 KiB


def test_the_piece_is_4_kib_up_to_16_gib_then_grows():
    assert resync.region_sectors(1 * GiB) == 8
    assert resync.region_sectors(16 * GiB) == 8
    assert resync.region_sectors(17 * GiB) == 16
    assert resync.region_sectors(1024 * GiB) == 512
    assert resync.regions(10 * 4096 + 512, 8) == 11


def test_era_blocks_become_merged_piece_ranges_clipped_to_the_disk():
    # 64 KiB era blocks (128 sectors), 4 KiB pieces (8 sectors): 16 pieces per block.
    assert resync.regions_of_blocks([(0, 1), (1, 2), (5, 7)], 128, 8, 1 << 20) == [(0, 32), (80, 112)]
    assert resync.regions_of_blocks([(15, 17)], 128, 8, 1 << 20) == [(240, 256)]   # past the end: clipped


def test_the_comparison_sends_digests_and_finds_exactly_the_differing_pieces(tmp_path):
    p, s = tmp_path / "p", tmp_path / "s"
    data = bytearray(b"\x11" * (1 << 20))
    p.write_bytes(bytes(data))
    data[5 * 4096 + 7] = 0x22
    data[200 * 4096] = 0x33
    s.write_bytes(bytes(data))
    from dmrepl.roles import digests
    asked = []

    def remote(spans, piece):
        asked.append((spans, piece))
        return lambda: digests.of_spans(str(s), spans, piece)

    cmp = resync.compare(str(p), [(0, 16), (196, 256)], 8, remote, fanout=8)
    assert cmp.differing == [5, 200] and cmp.candidate_pieces == 76
    # First a digest per 32 KiB for the whole groups, then per 4 KiB: the ragged start of the second
    # range (196-199), then the two groups that differ (0-7 and 200-207) in one request of two spans.
    K = 4096
    assert asked == [([(0, 16 * K), (200 * K, 56 * K)], 8 * K), ([(196 * K, 4 * K)], K),
                     ([(0, 8 * K), (200 * K, 8 * K)], K)]
    assert cmp.digest_bytes == (2 + 7 + 4 + 8 + 8) * digests.DIGEST_BYTES
    flat = resync.compare(str(p), [(0, 16), (196, 256)], 8, remote, fanout=1)
    assert flat.differing == [5, 200] and flat.digest_bytes == 76 * digests.DIGEST_BYTES


def test_coarsening_keeps_scattered_pieces_small_and_joins_clustered_ones():
    scattered = list(range(0, 4096, 97))
    assert resync.coarsen(scattered, 8, 1 << 30) == (8, scattered)
    clustered = list(range(256, 512))                        # [1 MiB, 2 MiB) in 4 KiB pieces
    assert resync.coarsen(clustered, 8, 1 << 30) == (1024, [2, 3])   # two regions of 512 KiB
    # One stray piece beside them: 32 KiB regions copy 264 pieces for 257 (1.03x), 64 KiB would be 1.06x.
    assert resync.coarsen(clustered + [5000], 8, 1 << 30)[0] == 64
    assert resync.coarsen([], 8, 1 << 30) == (8, [])


def test_the_copy_gets_what_the_digests_left_of_the_target():
    KiB = 1024
    assert resync.copy_budget(100 * KiB, 3 * KiB) == pytest.approx(1.02)
    assert resync.copy_budget(10 * KiB, 2 * KiB) == 1.0          # digests alone past 5 %: pieces only
    assert resync.copy_budget(0, 0) == 1.0
    # 19 clusters of 4 pieces on 16 KiB boundaries and one off them: 16 KiB regions copy 84 pieces
    # for 80 (5 % more); once the digests took that 5 %, the copy stays at the pieces.
    pieces = [p for c in range(0, 19 * 64, 64) for p in range(c, c + 4)] + list(range(19 * 64 + 1, 19 * 64 + 5))
    assert resync.coarsen(pieces, 8, 1 << 30)[0] == 32
    assert resync.coarsen(pieces, 8, 1 << 30, resync.copy_budget(80 * 4 * KiB, 16 * KiB)) == (8, pieces)


def test_hello_carries_the_primarys_heartbeat_timeout():
    h = Hello("id", "primary", 1 << 20, 8, 2048, [3], heartbeat_timeout_s=2.5)
    assert Hello.from_wire(h.to_wire()).heartbeat_timeout_s == 2.5
    older = {k: v for k, v in h.to_wire().items() if k != "heartbeat_timeout_s"}
    assert Hello.from_wire(older).heartbeat_timeout_s == 0   # a peer that does not say: no timeout


def test_candidate_lists_join_into_one_sorted_merged_list():
    # a failback's three sources: the new primary's era, the failover's rollback, the peer's diverged
    assert merge([(10, 12), (40, 41)], [(0, 2), (11, 20)], [(20, 22), (2, 3)]) == [(0, 3), (10, 22), (40, 41)]
    assert merge([], []) == []
    assert merge([(5, 5), (7, 6)]) == []         # empty ranges are dropped


def test_a_hello_carries_the_diverged_ranges_and_refuses_bad_ones():
    h = Hello("vm1", "secondary", 1 << 20, 8, 128, [2], diverged=[[0, 4096], [8192, 4096]])
    assert Hello.from_wire(h.to_wire()).diverged == [[0, 4096], [8192, 4096]]
    assert Hello.from_wire({**h.to_wire(), "diverged": None}).diverged is None
    for bad in ([[0, 0]], [[-1, 5]], [["x", 1]], [[1]]):
        with pytest.raises(ValueError):
            Hello.from_wire({**h.to_wire(), "diverged": bad})


def test_the_era_of_a_checkpoint_is_the_earliest_recorded_for_it():
    from dmrepl.state import ResourceState

    st = ResourceState(name="vm1", resource_id="vm1", history=[
        {"checkpoint": 2, "era": 7}, {"checkpoint": 2, "era": 5, "event": "up"}, {"checkpoint": 3, "era": 9},
        {"checkpoint": 4, "time": 1.0}])
    assert (st.era_of(2), st.era_of(3), st.era_of(4), st.era_of(1)) == (5, 9, None, None)


def test_scattered_pieces_go_in_few_requests_of_bounded_spans():
    from dmrepl.roles import digests
    ranges = [(i * 10, i * 10 + 1) for i in range(2500)]          # 2500 lone pieces
    batches = list(resync._batches(ranges, 2048))
    assert [len(b) for b in batches] == [digests.MAX_SPANS, digests.MAX_SPANS, 2500 - 2 * digests.MAX_SPANS]
    assert [s for b in batches for s in b] == [(r0, 1) for r0, _r1 in ranges]
    big = list(resync._batches([(0, 5000), (6000, 6001)], 2048))   # at most 2048 pieces a request
    assert big == [[(0, 2048)], [(2048, 2048)], [(4096, 904), (6000, 1)]]


def test_digest_requests_refuse_garbage_spans(tmp_path):
    from dmrepl.roles import digests
    p = tmp_path / "d.img"
    p.write_bytes(b"\x11" * 65536)
    assert digests.of_spans(str(p), [(0, 4096), (8192, 8192)], 4096) == (
        digests.of(str(p), 0, 4096, 4096) + digests.of(str(p), 8192, 8192, 4096))
    for bad in ([], [(0, 4096)] * (digests.MAX_SPANS + 1), [(0, digests.MAX_REQUEST_BYTES), (0, 4096)]):
        with pytest.raises(ValueError):
            digests.of_spans(str(p), bad, 4096)
    with pytest.raises(ValueError):
        digests.of_spans(str(p), [(100, 4096)], 4096)                 # not on a piece boundary
    for wire in ("0,4096", [[0]], [["0", 4096]], [[0, 4096.0]], None):
        with pytest.raises(ValueError):
            digests.spans_from_wire(wire)
    assert digests.spans_from_wire([[0, 4096], [8192, 4096]]) == [(0, 4096), (8192, 4096)]


def test_a_progress_callback_that_raises_ends_the_comparison_between_requests(tmp_path):
    # The daemon's stop: its progress callback raises after a request's answer, and no further
    # request goes out (each asks for at most MAX_REQUEST_BYTES).
    from dmrepl.roles import digests
    p = tmp_path / "p.img"
    p.write_bytes(b"\x11" * (24 << 20))
    asked = []

    class Stop(Exception):
        pass

    def remote(spans, piece):
        asked.append(spans)
        return lambda: digests.of_spans(str(p), spans, piece)

    def progress(done, total):
        raise Stop()

    with pytest.raises(Stop):
        resync.compare(str(p), [(0, (24 << 20) // 4096)], 8, remote, progress)
    assert len(asked) == 1 and sum(n for _o, n in asked[0]) == digests.MAX_REQUEST_BYTES


def test_a_first_level_piece_never_outgrows_a_request(tmp_path):
    # Regions of 2 MiB (disks over 4 TiB): 8 of them would be a 16 MiB first-level piece, more than
    # a request may hash; the comparison uses 4 (8 MiB) instead.
    from dmrepl.roles import digests
    p = tmp_path / "p.img"
    p.write_bytes(b"\x11" * (16 << 20))
    asked = []

    def remote(spans, piece):
        asked.append(piece)
        return lambda: digests.of_spans(str(p), spans, piece)

    cmp = resync.compare(str(p), [(0, 8)], 4096, remote)          # 8 regions of 2 MiB
    assert cmp.differing == [] and asked == [digests.MAX_REQUEST_BYTES] * 2     # two pieces of 8 MiB
