"""Block devices: size, block size, flush, discard, exclusive open, bulk copy.

Kernel reference: include/uapi/linux/fs.h (BLKGETSIZE64, BLKSSZGET, BLKDISCARD);
an O_EXCL open of a block device fails with EBUSY while it is mounted or held
by another exclusive opener (block/bdev.c: bd_prepare_to_claim).
"""

from __future__ import annotations

import mmap
import os
import stat
from contextlib import contextmanager
from typing import Callable, Iterable, Iterator

from dmrepl import _kernel
from dmrepl.kernel.errors import BlockDeviceError

SECTOR_BYTES = 512


def _open(path: str, flags: int, call: str = "open") -> int:
    try:
        return os.open(path, flags | os.O_CLOEXEC)
    except OSError as e:
        raise BlockDeviceError(e.errno, call, path) from None


@contextmanager
def opened(path: str, flags: int = os.O_RDONLY) -> Iterator[int]:
    fd = _open(path, flags)
    try:
        yield fd
    finally:
        os.close(fd)


def is_block_device(path: str) -> bool:
    try:
        return stat.S_ISBLK(os.stat(path).st_mode)
    except FileNotFoundError:
        return False


def size_bytes(path: str) -> int:
    """BLKGETSIZE64 for a block device; st_size for a regular file."""
    with opened(path) as fd:
        if stat.S_ISREG(os.fstat(fd).st_mode):
            return os.fstat(fd).st_size
        try:
            return _kernel.blk_size_bytes(fd)
        except OSError as e:
            raise BlockDeviceError(e.errno, "BLKGETSIZE64", path) from None


def size_sectors(path: str) -> int:
    return size_bytes(path) // SECTOR_BYTES


def logical_block_size(path: str) -> int:
    """BLKSSZGET: bytes."""
    with opened(path) as fd:
        try:
            return _kernel.blk_logical_block_size(fd)
        except OSError as e:
            raise BlockDeviceError(e.errno, "BLKSSZGET", path) from None


def flush(path: str) -> None:
    """fsync on a block device sends a cache flush (REQ_PREFLUSH) down the stack."""
    with opened(path, os.O_RDONLY) as fd:
        try:
            os.fsync(fd)
        except OSError as e:
            raise BlockDeviceError(e.errno, "fsync", path) from None


def discard(path: str, offset_bytes: int, length_bytes: int) -> None:
    """BLKDISCARD of [offset, offset + length), bytes."""
    with opened(path, os.O_RDWR) as fd:
        try:
            _kernel.blk_discard(fd, offset_bytes, length_bytes)
        except OSError as e:
            raise BlockDeviceError(e.errno, "BLKDISCARD", path) from None


def check_not_busy(path: str) -> None:
    """Raise BlockDeviceError(EBUSY) if the device is mounted or claimed (O_EXCL open)."""
    fd = _open(path, os.O_RDONLY | os.O_EXCL, "open O_EXCL")
    os.close(fd)


def _aligned(offset_bytes: int, length: int) -> bool:
    return offset_bytes % 512 == 0 and length % 512 == 0


def read_at(path: str, offset_bytes: int, length_bytes: int, *, direct: bool = True) -> bytes:
    """Read bytes at an offset, for checks and tests (not bulk data).

    On a block device, aligned reads use O_DIRECT: each device of a stack
    (loop, dm) has its own page cache, so a buffered read of a lower device
    can return data that a write through an upper device has since replaced.
    """
    use_direct = direct and _aligned(offset_bytes, length_bytes) and is_block_device(path)
    with opened(path, os.O_RDONLY | (os.O_DIRECT if use_direct else 0)) as fd:
        out = bytearray()
        buf = mmap.mmap(-1, min(length_bytes, 1 << 20) or 4096) if use_direct else None
        try:
            while len(out) < length_bytes:
                pos = offset_bytes + len(out)
                want = length_bytes - len(out)
                try:
                    if buf is not None:
                        with memoryview(buf) as mv, mv[:min(want, len(buf))] as view:
                            n = os.preadv(fd, [view], pos)
                            chunk = bytes(view[:n])
                    else:
                        chunk = os.pread(fd, want, pos)
                except OSError as e:
                    raise BlockDeviceError(e.errno, "pread", path, f"at byte {pos}") from None
                if not chunk:
                    break
                out += chunk
        finally:
            if buf is not None:
                buf.close()
        return bytes(out)


def write_at(path: str, offset_bytes: int, data: bytes, *, direct: bool = True) -> None:
    """Write bytes at an offset, durably (O_DIRECT|O_DSYNC when aligned, else O_DSYNC)."""
    use_direct = direct and _aligned(offset_bytes, len(data)) and is_block_device(path)
    flags = os.O_WRONLY | os.O_DSYNC | (os.O_DIRECT if use_direct else 0)
    with opened(path, flags) as fd:
        done = 0
        buf = mmap.mmap(-1, min(len(data), 1 << 20) or 4096) if use_direct else None
        try:
            while done < len(data):
                pos = offset_bytes + done
                try:
                    if buf is not None:
                        n = min(len(data) - done, len(buf))
                        buf[:n] = data[done:done + n]
                        with memoryview(buf) as mv, mv[:n] as view:
                            done += os.pwritev(fd, [view], pos)
                    else:
                        done += os.pwrite(fd, data[done:], pos)
                except OSError as e:
                    raise BlockDeviceError(e.errno, "pwrite", path, f"at byte {pos}") from None
        finally:
            if buf is not None:
                buf.close()


def copy_extents(src: str, dst: str, extents: Iterable[tuple[int, int]], *,
                 io_bytes: int = 1 << 20, direct: bool = True,
                 progress: Callable[[int], None] | None = None) -> int:
    """Copy (offset_bytes, length_bytes) extents from src to dst at the same offsets.

    With direct=True both sides are opened O_DIRECT (extents must then be
    aligned to the logical block size) so that a bulk copy does not push the
    page cache out.  The destination is fsynced at the end.  Returns bytes copied.
    """
    extents = list(extents)
    dflag = os.O_DIRECT if direct else 0
    if direct:
        for off, length in extents:
            if off % 4096 or length % 512:
                raise ValueError(f"extent ({off}, {length}) is not aligned for O_DIRECT")
    sfd = _open(src, os.O_RDONLY | dflag)
    try:
        dfd = _open(dst, os.O_WRONLY | dflag)
        try:
            try:
                done = _kernel.copy_extents(sfd, dfd, extents, io_bytes, 0, progress)
            except OSError as e:
                raise BlockDeviceError(e.errno, "copy", f"{src} -> {dst}", e.strerror) from None
            try:
                os.fsync(dfd)
            except OSError as e:
                raise BlockDeviceError(e.errno, "fsync", dst) from None
            return done
        finally:
            os.close(dfd)
    finally:
        os.close(sfd)


def io_bytes(path: str) -> tuple[int, int]:
    """(bytes read, bytes written) through block device `path` since it appeared, from its
    /sys/dev/block/MAJ:MIN/stat (Documentation/block/stat.rst: fields 3 and 7 count 512-byte
    sectors, whatever the device's logical block size)."""
    rdev = os.stat(path).st_rdev
    with open(f"/sys/dev/block/{os.major(rdev)}:{os.minor(rdev)}/stat") as f:
        fields = f.read().split()
    return int(fields[2]) * SECTOR_BYTES, int(fields[6]) * SECTOR_BYTES
