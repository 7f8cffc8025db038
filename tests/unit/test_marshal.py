"""The Cython marshalling of dm ioctl payloads, checked without a kernel (unit tier)."""

import struct

from dmrepl import _kernel
from dmrepl.kernel import era


def test_header_layout_matches_dm_ioctl_h():
    # struct dm_ioctl: 3+5 u32, u32 event_nr, u32 padding, u64 dev, name[128], uuid[129], data[7]
    assert _kernel.HEADER_SIZE == 312
    assert _kernel.TARGET_SPEC_SIZE == 40
    assert _kernel.NAME_LEN == 128 and _kernel.UUID_LEN == 129


def test_pack_targets_aligns_and_chains():
    data = _kernel.pack_targets([(0, 100, "linear", "7:0 0"), (100, 28, "error", "")])
    start, length, status, nxt = struct.unpack_from("<QQiI", data, 0)
    assert (start, length, status) == (0, 100, 0)
    assert nxt % 8 == 0 and nxt == (40 + len("7:0 0") + 1 + 7) // 8 * 8
    assert data[24:30] == b"linear"
    assert data[40:46] == b"7:0 0\0"
    start2, length2, _, nxt2 = struct.unpack_from("<QQiI", data, nxt)
    assert (start2, length2) == (100, 28)
    assert data[nxt + 24:nxt + 29] == b"error"
    assert len(data) == nxt + nxt2


def _status_blob(specs):
    """Build DM_TABLE_STATUS-style output: `next` counts from the first spec."""
    out = bytearray()
    for start, length, ttype, text in specs:
        body = text.encode() + b"\0"
        size = (40 + len(body) + 7) // 8 * 8
        nxt = len(out) + size
        out += struct.pack("<QQiI16s", start, length, 0, nxt, ttype.encode()) + body
        out += b"\0" * (size - 40 - len(body))
    return bytes(out)


def test_unpack_targets():
    specs = [(0, 100, "snapshot", "16/2048 16"), (100, 8, "era", "8 10/1024 3 -")]
    assert _kernel.unpack_targets(_status_blob(specs), 2) == specs


def _name_record(dev, name, uuid, last):
    body = struct.pack("<QI", dev, 0) + name.encode() + b"\0"
    body += b"\0" * (-len(body) % 8)
    body += struct.pack("<II", 7, 1 if uuid else 0) + (uuid.encode() + b"\0" if uuid else b"")
    body += b"\0" * (-len(body) % 8)
    return body


def test_unpack_name_list_with_uuids():
    recs = [_name_record(0xFE00, "dmrepl-a-origin", "DMREPL-a-origin", False),
            _name_record(0xFE01, "other", None, True)]
    blob = bytearray(recs[0])
    struct.pack_into("<I", blob, 8, len(recs[0]))
    blob += recs[1]
    assert _kernel.unpack_name_list(bytes(blob)) == [
        ("dmrepl-a-origin", 0xFE00, 7, "DMREPL-a-origin"), ("other", 0xFE01, 7, None)]
    assert _kernel.unpack_name_list(bytes(16)) == []


def test_unpack_versions_and_deps():
    rec1 = struct.pack("<IIII", 32, 1, 16, 0) + b"snapshot\0"
    rec1 += b"\0" * (32 - len(rec1))
    rec2 = struct.pack("<IIII", 0, 1, 0, 0) + b"era\0"
    assert _kernel.unpack_versions(rec1 + rec2) == [("snapshot", (1, 16, 0)), ("era", (1, 0, 0))]
    deps = struct.pack("<II", 2, 0) + struct.pack("<QQ", 0x700, 0x701)
    assert _kernel.unpack_deps(deps) == [0x700, 0x701]


def test_pack_message():
    assert _kernel.pack_message(8, "checkpoint") == struct.pack("<Q", 8) + b"checkpoint\0"


def test_era_invalidate_xml():
    xml = """<blocks>
  <block block="0"/>
  <range begin="16" end = "18"/>
  <block block="18"/>
  <block block="160"/>
</blocks>
"""
    assert era.parse_blocks(xml) == [(0, 1), (16, 19), (160, 161)]
    assert era.parse_blocks("<blocks>\n</blocks>\n") == []
