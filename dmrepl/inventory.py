"""The dm devices dmrepl created on this host (uuid prefix DMREPL-), as values for `dmrepl ls`."""

from __future__ import annotations

import os
from dataclasses import dataclass

from dmrepl.kernel import dm
from dmrepl.names import is_ours


@dataclass(frozen=True)
class DeviceRow:
    name: str
    uuid: str
    dev: str
    open_count: int
    suspended: bool
    deferred_remove: bool   # removed by the kernel when its last opener closes it
    targets: list[str]


def ours() -> list[DeviceRow]:
    rows = []
    with dm.Control() as ctl:
        for entry in ctl.list_devices():
            if not is_ours(entry.uuid):
                continue
            info = ctl.info(entry.name)
            types = [s.target_type for s in ctl.table(entry.name)] if info.live_table else []
            rows.append(DeviceRow(name=entry.name, uuid=entry.uuid, dev=info.devno, open_count=info.open_count,
                                  suspended=info.suspended, deferred_remove=info.deferred_remove, targets=types))
    return rows


def available() -> bool:
    """Is device-mapper there at all (the control node exists)?"""
    return os.path.exists(dm.CONTROL_PATH)
