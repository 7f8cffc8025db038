"""The secondary's backing devices, checked before anything is created.

Bad input gets a clear error and changes nothing: a missing path, a disk and
stores of different kinds, wrong sizes, a device in use (attached, mounted,
held by another dm device, open by a process).
"""

from __future__ import annotations

from dmrepl.config import SecondaryConfig
from dmrepl.errors import DmreplError
from dmrepl.kernel import blockdev
from dmrepl.roles.backing import check_unused, kind

MiB = 1 << 20
SECTOR = 512
MIN_DISK_BYTES = 1 * MiB
MIN_STORE_BYTES = 1 * MiB


def backing_paths(cfg: SecondaryConfig) -> list[tuple[str, str]]:
    """(what, configured path) of the disk and the two hidden stores."""
    return [("disk", cfg.disk), ("hidden store 0", cfg.hidden_stores[0]),
            ("hidden store 1", cfg.hidden_stores[1])]


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
