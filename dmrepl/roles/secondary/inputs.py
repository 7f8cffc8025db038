"""The secondary's backing devices, checked before anything is created.

Bad input gets a clear error and changes nothing: a missing path, a disk and
stores of different kinds, wrong sizes, a device in use (attached, mounted,
held by another dm device, open by a process).
"""

from __future__ import annotations

import errno
import os
import stat

from dmrepl.config import SecondaryConfig
from dmrepl.errors import DmreplError
from dmrepl.kernel import blockdev, loop, procfs
from dmrepl.kernel.errors import BlockDeviceError

MiB = 1 << 20
SECTOR = 512
MIN_DISK_BYTES = 1 * MiB
MIN_STORE_BYTES = 1 * MiB


def backing_paths(cfg: SecondaryConfig) -> list[tuple[str, str]]:
    """(what, configured path) of the disk and the two hidden stores."""
    return [("disk", cfg.disk), ("hidden store 0", cfg.hidden_stores[0]),
            ("hidden store 1", cfg.hidden_stores[1])]


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


def check(cfg: SecondaryConfig) -> None:
    """Refuse bad backing devices before touching anything."""
    kinds = {what: kind(path, what) for what, path in backing_paths(cfg)}
    if len(set(kinds.values())) != 1:
        desc = ", ".join(f"{w} is a {'file' if k == 'file' else 'block device'}" for w, k in kinds.items())
        raise DmreplError(f"the disk and the hidden stores must be of one kind: {desc}",
                          "use image files for all three, or block devices for all three")
    disk_bytes = blockdev.size_bytes(cfg.disk)
    chunk_bytes = cfg.chunk_sectors * SECTOR
    if disk_bytes < MIN_DISK_BYTES or disk_bytes % chunk_bytes:
        raise DmreplError(f"disk {cfg.disk} is {disk_bytes} bytes: it must be at least "
                          f"{MIN_DISK_BYTES} bytes and a multiple of the chunk size ({chunk_bytes} bytes)")
    for i, store in enumerate(cfg.hidden_stores):
        size = blockdev.size_bytes(store)
        if size < MIN_STORE_BYTES:
            raise DmreplError(f"hidden store {i} {store} is {size} bytes: it must be at least "
                              f"{MIN_STORE_BYTES} bytes", "size a store for the writes expected "
                              "between two checkpoints (both stores alike)")
    for what, path in backing_paths(cfg):
        check_unused(what, path)


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
