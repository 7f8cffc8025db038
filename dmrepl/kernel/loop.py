"""Loop devices through /dev/loop-control and LOOP_CONFIGURE, without losetup.

Kernel reference: include/uapi/linux/loop.h, drivers/block/loop.c.
"""

from __future__ import annotations

import errno
import glob
import os
from dataclasses import dataclass

from dmrepl import _kernel, poll
from dmrepl.kernel.errors import LoopError

LOOP_CONTROL = "/dev/loop-control"
_LO = _kernel.LO_FLAGS


@dataclass(frozen=True)
class LoopInfo:
    """LOOP_GET_STATUS64 of a bound loop device (offsets and limits in bytes)."""

    path: str
    number: int
    backing_file: str
    offset_bytes: int
    sizelimit_bytes: int
    read_only: bool
    autoclear: bool
    direct_io: bool


def attach(file: str, *, read_only: bool = False, direct_io: bool = False,
           autoclear: bool = False, retries: int = 20) -> str:
    """Bind `file` to a free loop device; returns its path (/dev/loopN).

    LOOP_CTL_GET_FREE only names a device that was free when asked: another
    process may bind it before our LOOP_CONFIGURE, which then fails with EBUSY.
    That race is retried with a new free device.
    """
    flags = 0
    if read_only:
        flags |= _LO["READ_ONLY"]
    if direct_io:
        flags |= _LO["DIRECT_IO"]
    if autoclear:
        flags |= _LO["AUTOCLEAR"]
    try:
        file_fd = os.open(file, (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC)
    except OSError as e:
        raise LoopError(e.errno, "open", file) from None
    try:
        try:
            ctl_fd = os.open(LOOP_CONTROL, os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            raise LoopError(e.errno, "open", LOOP_CONTROL, "load the loop module (modprobe loop)") from None
        try:
            for attempt in range(retries + 1):
                try:
                    number = _kernel.loop_ctl_get_free(ctl_fd)
                except OSError as e:
                    raise LoopError(e.errno, "LOOP_CTL_GET_FREE", LOOP_CONTROL) from None
                path = f"/dev/loop{number}"
                try:
                    loop_fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
                except OSError as e:
                    raise LoopError(e.errno, "open", path) from None
                try:
                    _kernel.loop_configure(loop_fd, file_fd, flags, 0, 0, 0, os.path.abspath(file))
                    return path
                except OSError as e:
                    if e.errno == errno.EBUSY and attempt < retries:
                        continue
                    raise LoopError(e.errno, "LOOP_CONFIGURE", path, f"backing file {file}") from None
                finally:
                    os.close(loop_fd)
        finally:
            os.close(ctl_fd)
    finally:
        os.close(file_fd)
    raise AssertionError("unreachable")


def _on_device(path: str, call: str, fn, flags: int = os.O_RDONLY):
    """Open the loop device, run fn(fd) as `call`, close it; errors name call and device."""
    try:
        fd = os.open(path, flags | os.O_CLOEXEC)
    except OSError as e:
        raise LoopError(e.errno, "open", path) from None
    try:
        return fn(fd)
    except OSError as e:
        raise LoopError(e.errno, call, path) from None
    finally:
        os.close(fd)


def detach(path: str, *, wait: float = 5.0) -> bool:
    """LOOP_CLR_FD, then wait up to `wait` seconds for the detach to finish.

    The kernel defers the detach until the last opener closes the device
    (drivers/block/loop.c: loop_clr_fd sets Lo_rundown); udev's probes hold
    a fresh device open briefly.  Returns True once the device is unbound.
    """
    _on_device(path, "LOOP_CLR_FD", _kernel.loop_clr_fd)
    return poll.until(lambda: backing_file(path) is None, timeout=wait)


def info(path: str) -> LoopInfo:
    """LOOP_GET_STATUS64; ENXIO when nothing is bound."""
    st = _on_device(path, "LOOP_GET_STATUS64", _kernel.loop_get_status64)
    # lo_file_name is cut at 63 bytes: sysfs holds the full path.
    backing = backing_file(path) or st["file_name"]
    return LoopInfo(path=path, number=st["number"], backing_file=backing,
                    offset_bytes=st["offset"], sizelimit_bytes=st["sizelimit"],
                    read_only=bool(st["flags"] & _LO["READ_ONLY"]),
                    autoclear=bool(st["flags"] & _LO["AUTOCLEAR"]),
                    direct_io=bool(st["flags"] & _LO["DIRECT_IO"]))


def backing_file(path: str) -> str | None:
    """The full backing file path from sysfs, or None when the device is unbound."""
    name = os.path.basename(path)
    try:
        with open(f"/sys/block/{name}/loop/backing_file") as f:
            return f.read().rstrip("\n")
    except (FileNotFoundError, OSError):
        return None


def set_capacity(path: str) -> None:
    """LOOP_SET_CAPACITY: pick up a backing file that grew."""
    _on_device(path, "LOOP_SET_CAPACITY", _kernel.loop_set_capacity)


def list_attached() -> dict[str, str]:
    """Bound loop devices: {"/dev/loopN": backing file}."""
    out = {}
    for d in sorted(glob.glob("/sys/block/loop*/loop/backing_file")):
        name = d.split("/")[3]
        try:
            with open(d) as f:
                out[f"/dev/{name}"] = f.read().rstrip("\n")
        except OSError:
            continue
    return out


def backing_id(path: str) -> tuple[int, int, int]:
    """(major, minor, inode) of a bound loop device's backing file (LOOP_GET_STATUS64)."""
    lo = _on_device(path, "LOOP_GET_STATUS64", _kernel.loop_get_status64)
    return os.major(lo["backing_dev"]), os.minor(lo["backing_dev"]), lo["backing_inode"]


def file_id(file: str) -> tuple[int, int, int]:
    st = os.stat(file)
    return os.major(st.st_dev), os.minor(st.st_dev), st.st_ino


def find(file: str) -> list[str]:
    """Loop devices bound to `file`: by absolute path, or by device and inode where the path differs.

    sysfs shows the backing path as the *reader's* mount namespace sees the
    mount the file was opened through: a loop device attached by a process in
    another mount namespace (`ip netns exec` makes one) shows a path relative
    to that mount's root, e.g. /pytest-1/s.img for /tmp/pytest-1/s.img
    (docs/kernel-notes.md).  Such a path is a suffix of the real one; the
    backing file's device and inode decide.
    """
    target = os.path.abspath(file)
    found = []
    for dev, backing in list_attached().items():
        backing = backing.removesuffix(" (deleted)")
        if backing == target:
            found.append(dev)
        elif backing and target.endswith(backing):
            try:
                if backing_id(dev) == file_id(target):
                    found.append(dev)
            except (LoopError, OSError):
                continue
    return found


def by_devno(major: int, minor: int) -> str | None:
    """/dev/loopN for a bound loop device's MAJOR:MINOR, or None if it is not one."""
    for dev in list_attached():
        try:
            rdev = os.stat(dev).st_rdev
        except OSError:
            continue
        if (os.major(rdev), os.minor(rdev)) == (major, minor):
            return dev
    return None
