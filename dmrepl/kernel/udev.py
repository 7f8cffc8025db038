"""udev: is it running, are dmrepl's rules installed, and waiting for a symlink (pyudev)."""

from __future__ import annotations

import os
import stat
import time

RULES_NAME = "56-dmrepl.rules"
RULES_DIRS = ("/etc/udev/rules.d", "/run/udev/rules.d", "/lib/udev/rules.d", "/usr/lib/udev/rules.d")


def running() -> bool:
    """systemd-udevd creates its control socket /run/udev/control while it runs."""
    return os.path.exists("/run/udev/control")


def rules_installed() -> bool:
    return any(os.path.exists(os.path.join(d, RULES_NAME)) for d in RULES_DIRS)


def settle(timeout: float = 10.0) -> bool:
    """Wait until udevd's event queue is empty (it keeps /run/udev/queue while not).

    Used before creating a device: the remove event of an earlier device of
    the same name, processed late, deletes the /dev/mapper name that udev has
    just given the new one (docs/kernel-notes.md).  Returns False on timeout.
    """
    deadline = time.monotonic() + timeout
    quiet = 0
    while quiet < 2:
        if os.path.exists("/run/udev/queue"):
            quiet = 0
            if time.monotonic() > deadline:
                return False
        else:
            quiet += 1
        time.sleep(0.01)
    return True


def points_to(path: str, major: int, minor: int) -> bool:
    """True if `path` (a node or a symlink) resolves to the block device major:minor."""
    try:
        st = os.stat(path)
    except OSError:
        return False
    return stat.S_ISBLK(st.st_mode) and st.st_rdev == os.makedev(major, minor)


def wait_for_link(link: str, major: int, minor: int, timeout: float = 10.0) -> bool:
    """Wait until `link` resolves to the block device major:minor; False on timeout.

    A pyudev monitor is started *before* the first check, so an event that
    lands between the check and the wait is not missed.
    """
    import pyudev  # here, not at import time: no udev context unless needed

    context = pyudev.Context()
    monitor = pyudev.Monitor.from_netlink(context, source="udev")
    monitor.filter_by("block")
    monitor.start()
    deadline = time.monotonic() + timeout
    while True:
        if points_to(link, major, minor):
            return True
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        monitor.poll(timeout=min(left, 0.5))
