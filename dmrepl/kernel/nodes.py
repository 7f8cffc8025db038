"""/dev/mapper/NAME: made by udev where it runs, by us where it does not (as libdevmapper does).

With systemd-udevd running, Debian's 55-dm.rules makes /dev/mapper/NAME a
symlink once the device has a live table, and udev deletes names it did not
create when it re-evaluates its links (docs/kernel-notes.md): so the name is
left to udev and waited for after a resume.
"""

from __future__ import annotations

import os
import stat

from dmrepl import poll
from dmrepl.kernel import udev

MAPPER_DIR = "/dev/mapper"


def ensure(info, *, wait: float = 10.0) -> None:
    """Make /dev/mapper/NAME point at the device `info` (a dm.DeviceInfo) describes.

    With udev, wait up to `wait` seconds for its name, then create the node
    ourselves; without udev, create it at once.
    """
    path = os.path.join(MAPPER_DIR, info.name)
    if udev.points_to(path, info.major, info.minor):
        return
    if udev.running():
        if not info.live_table:
            return  # udev names the device at its first resume
        if poll.until(lambda: udev.points_to(path, info.major, info.minor), timeout=wait, interval=0.005):
            return
    try:
        if os.path.lexists(path):
            os.unlink(path)  # stale node of an earlier device with this name
        os.mknod(path, 0o600 | stat.S_IFBLK, os.makedev(info.major, info.minor))
    except FileExistsError:
        pass  # udev won the race


def drop(name: str) -> None:
    path = os.path.join(MAPPER_DIR, name)
    if udev.running() and os.path.islink(path):
        return  # udev's own symlink: udev removes it on the remove event
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
