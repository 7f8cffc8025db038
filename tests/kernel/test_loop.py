"""Loop devices through LOOP_CONFIGURE (kernel tier)."""

import errno
import os

import pytest

from dmrepl import poll
from dmrepl.kernel import blockdev, loop
from dmrepl.kernel.errors import BlockDeviceError, LoopError

MiB = 1 << 20


def test_attach_sparse_file_exact_size_and_detach(tmp_path):
    path = tmp_path / "disk.img"
    with open(path, "wb") as f:
        f.truncate(48 * MiB + 4096)
    dev = loop.attach(str(path))
    try:
        assert blockdev.size_bytes(dev) == 48 * MiB + 4096
        assert blockdev.logical_block_size(dev) == 512
        info = loop.info(dev)
        assert info.backing_file == str(path)
        assert not info.read_only and not info.autoclear
        assert loop.find(str(path)) == [dev]
        blockdev.write_at(dev, MiB, b"\xab" * 4096)
        assert blockdev.read_at(dev, MiB, 4096) == b"\xab" * 4096
        blockdev.flush(dev)
        with open(path, "rb") as f:
            f.seek(MiB)
            assert f.read(4096) == b"\xab" * 4096
    finally:
        loop.detach(dev)
    assert loop.find(str(path)) == []


def test_read_only_and_direct_io_flags(tmp_path):
    path = tmp_path / "ro.img"
    with open(path, "wb") as f:
        f.truncate(8 * MiB)
    dev = loop.attach(str(path), read_only=True)
    try:
        assert loop.info(dev).read_only
        with pytest.raises(BlockDeviceError) as e:
            blockdev.write_at(dev, 0, b"x" * 512)
        assert e.value.errno in (errno.EPERM, errno.EACCES, errno.EROFS)
    finally:
        loop.detach(dev)
    # autoclear: the kernel detaches the device when its last opener closes
    # it; attach() itself closes it, so nobody holds it and it goes away.
    dev = loop.attach(str(path), autoclear=True)
    poll.wait_for(lambda: loop.backing_file(dev), f"autoclear to unbind {dev}", ok=lambda v: v is None)


def test_set_capacity_after_file_grows(tmp_path):
    path = tmp_path / "grow.img"
    with open(path, "wb") as f:
        f.truncate(4 * MiB)
    dev = loop.attach(str(path))
    try:
        assert blockdev.size_bytes(dev) == 4 * MiB
        with open(path, "r+b") as f:
            f.truncate(12 * MiB)
        loop.set_capacity(dev)
        assert blockdev.size_bytes(dev) == 12 * MiB
    finally:
        loop.detach(dev)


def test_many_attaches_get_distinct_devices(tmp_path):
    devs = []
    try:
        for i in range(6):
            p = tmp_path / f"f{i}.img"
            with open(p, "wb") as f:
                f.truncate(MiB)
            devs.append(loop.attach(str(p)))
        assert len(set(devs)) == 6
    finally:
        for d in devs:
            loop.detach(d)


def test_missing_file_is_a_typed_error(tmp_path):
    with pytest.raises(LoopError) as e:
        loop.attach(str(tmp_path / "nope.img"))
    assert e.value.errno == errno.ENOENT
    assert "nope.img" in str(e.value)


def test_info_of_unbound_device_is_enxio(tmp_path):
    path = tmp_path / "x.img"
    with open(path, "wb") as f:
        f.truncate(MiB)
    dev = loop.attach(str(path))
    loop.detach(dev)
    with pytest.raises(LoopError) as e:
        loop.info(dev)
    assert e.value.errno == errno.ENXIO


def test_copy_extents_and_discard(loops):
    src = loops.make("src", 16 * MiB)
    dst = loops.make("dst", 16 * MiB)
    blockdev.write_at(src, 0, bytes(range(256)) * 16 * 256)  # 1 MiB pattern
    blockdev.write_at(src, 8 * MiB, b"\x5a" * (2 * MiB))
    seen = []
    done = blockdev.copy_extents(src, dst, [(0, MiB), (8 * MiB, 2 * MiB)], io_bytes=512 * 1024,
                                 progress=seen.append)
    assert done == 3 * MiB
    assert seen == [512 * 1024 * k for k in range(1, 7)]
    assert blockdev.read_at(dst, 0, MiB) == bytes(range(256)) * 16 * 256
    assert blockdev.read_at(dst, 8 * MiB, 2 * MiB) == b"\x5a" * (2 * MiB)
    assert blockdev.read_at(dst, 4 * MiB, MiB) == bytes(MiB)
    blockdev.discard(dst, 8 * MiB, MiB)
    assert blockdev.read_at(dst, 8 * MiB, MiB) == bytes(MiB)
    assert blockdev.read_at(dst, 9 * MiB, MiB) == b"\x5a" * MiB
    os.sync()


def test_copy_past_the_end_of_the_source_keeps_an_errno(loops):
    src = loops.make("small", 2 * MiB)
    dst = loops.make("big", 4 * MiB)
    with pytest.raises(BlockDeviceError) as e:
        blockdev.copy_extents(src, dst, [(0, 4 * MiB)])
    assert e.value.errno == errno.EIO and e.value.call == "copy"
    assert f"read at byte {2 * MiB}: the source ends before the extent does" in str(e.value)
