"""Every name dmrepl gives a kernel object or a path, built here and nowhere else.

    dmrepl-NAME-origin  DMREPL-NAME-origin   secondary: snapshot-origin (or merge) over S
    dmrepl-NAME-hidden  DMREPL-NAME-hidden   secondary: snapshot S Hk (the hidden store)
    dmrepl-NAME-active  DMREPL-NAME-active   secondary: linear, what its consumer opens
    dmrepl-NAME-era     DMREPL-NAME-era      secondary after a failover: era over origin, under active
    dmrepl-NAME-era-settle                   `resolve`: an era loaded and removed at once (kernel/era.settle)
    /dev/dmrepl/NAME/active                  udev's stable link (udev/56-dmrepl.rules)
    dmrepl-NAME         DMREPL-NAME-top      primary: era over the mirror, what its consumer opens
    dmrepl-NAME-mirror  DMREPL-NAME-mirror   primary: mirror of P and the NBD leg
    /dev/dmrepl/NAME/primary                 udev's stable link to dmrepl-NAME

Every dm device dmrepl creates carries the uuid prefix DMREPL-, so that it can
be found, listed and cleaned up without touching anyone else's devices
(`dmrepl ls`, the kernel tier's sweep).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from dmrepl.kernel.nodes import MAPPER_DIR

UUID_PREFIX = "DMREPL-"
NAME_PREFIX = "dmrepl-"
LINK_DIR = "/dev/dmrepl"

SECONDARY_PARTS = ("origin", "hidden", "active", "era")


def outdated_mark(resource_id: str) -> str:
    """The name a cluster records a host's outdated mark under ([fencing]: ocf/crm-fencing's node
    attribute, which ocf/dmrepl reads): the resource id both hosts share, in characters any
    cluster's attribute names take."""
    return NAME_PREFIX + re.sub(r"[^A-Za-z0-9_.-]", "_", resource_id) + "-outdated"


def is_ours(uuid: str) -> bool:
    return uuid.startswith(UUID_PREFIX)


@dataclass(frozen=True)
class StackNames:
    """The dm names, uuids and paths of one resource's stack on this host."""

    resource: str

    def dm(self, part: str) -> str:
        return f"{NAME_PREFIX}{self.resource}-{part}"

    def uuid(self, part: str) -> str:
        return f"{UUID_PREFIX}{self.resource}-{part}"

    def mapper_path(self, part: str) -> str:
        return os.path.join(MAPPER_DIR, self.dm(part))

    def link(self, part: str) -> str:
        """The stable name udev gives a device consumers open."""
        return os.path.join(LINK_DIR, self.resource, part)

    def top(self) -> str:
        """The primary's consumer device: dmrepl-NAME, without a part."""
        return f"{NAME_PREFIX}{self.resource}"

    def mapper_path_top(self) -> str:
        return os.path.join(MAPPER_DIR, self.top())

