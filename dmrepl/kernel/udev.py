"""udev: is it running, are dmrepl's rules installed, and waiting for a symlink (pyudev)."""

from __future__ import annotations

import os
import time

RULES_NAME = "56-dmrepl.rules"
RULES_DIRS = ("/etc/udev/rules.d", "/run/udev/rules.d", "/lib/udev/rules.d", "/usr/lib/udev/rules.d")


def running() -> bool:
    return os.path.exists("/run/udev/control")


def rules_installed() -> bool:
    return any(os.path.exists(os.path.join(d, RULES_NAME)) for d in RULES_DIRS)


def _points_to(link: str, rdev: int) -> bool:
    try:
        return os.stat(link).st_rdev == rdev
    except OSError:
        return False


def wait_for_link(link: str, major: int, minor: int, timeout: float = 10.0) -> bool:
    """Wait until `link` resolves to the block device major:minor; False on timeout.

    A pyudev monitor is started *before* the first check, so an event that
    lands between the check and the wait is not missed.
    """
    import pyudev  # here, not at import time: no udev context unless needed

    rdev = os.makedev(major, minor)
    context = pyudev.Context()
    monitor = pyudev.Monitor.from_netlink(context, source="udev")
    monitor.filter_by("block")
    monitor.start()
    deadline = time.monotonic() + timeout
    while True:
        if _points_to(link, rdev):
            return True
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        monitor.poll(timeout=min(left, 0.5))
