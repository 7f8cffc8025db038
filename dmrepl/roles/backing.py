"""Checks both roles make on the paths they are given, before anything is created.

A path is an image file (dmrepl attaches a loop device over it) or a block
device (used as it is, never detached by dmrepl); either must be unused.
"""

from __future__ import annotations

import errno
import os
import stat

from dmrepl.errors import DmreplError
from dmrepl.kernel import blockdev, loop, procfs
from dmrepl.kernel.errors import BlockDeviceError


def kind(path: str, what: str) -> str:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise DmreplError(f"{what} {path} does not exist", "create it (an image file or a block device) "
                          "or fix the path in the config") from None
    if stat.S_ISREG(st.st_mode):
        return "file"
    if stat.S_ISBLK(st.st_mode):
        return "block"
    raise DmreplError(f"{what} {path} is neither a regular file nor a block device")


def check_unused(what: str, path: str) -> None:
    if os.path.isfile(path):
        bound = loop.find(path)
        if bound:
            raise DmreplError(f"{what} {path} is in use: attached to {', '.join(bound)}",
                              "detach it (losetup -d) or bring the owning stack down first")
    else:
        try:
            blockdev.check_not_busy(path)
        except BlockDeviceError as e:
            if e.errno == errno.EBUSY:
                held = procfs.holders(path)
                raise DmreplError(f"{what} {path} is in use (mounted or held"
                                  f"{' by ' + ', '.join(held) if held else ''})",
                                  "unmount it or remove what is stacked on it") from None
            raise
    users = procfs.openers(path)
    if users:
        raise DmreplError(f"{what} {path} is open by {procfs.describe(users)}", "stop those processes first")
