"""The primary's devices: a mirror of P and the NBD leg, era over it.

The mirror is built without handle_errors: a write that fails on the NBD leg is
completed from P and the leg is marked failed ("D" in the status), so that a
dead secondary stalls the consumer for at most the NBD timeout instead of
holding writes until userspace suspends the mirror (DESIGN.md section 3).
Reads go to the first leg, P.  The initial sync is done by dmrepl before the
mirror is built, so the mirror starts "nosync".
"""

from __future__ import annotations

from dataclasses import dataclass

from dmrepl.kernel import blockdev, dm, switch
from dmrepl.kernel.status import EraStatus, MirrorStatus
from dmrepl.kernel.tables import Era, Mirror
from dmrepl.names import StackNames

SECTOR = 512
PRIMARY_PARTS = ("mirror", "top")


@dataclass(frozen=True)
class PrimaryLayout:
    """What the primary's stack is built from (block devices) and how."""

    disk: str                 # P
    nbd: str                  # /dev/nbdN: the secondary's disk S over NBD
    era_metadata: str         # a small device for dm-era's metadata
    era_block_sectors: int    # change-tracking granularity
    region_sectors: int = 1024  # dm-mirror region (512 KiB)


class PrimaryStack:
    def __init__(self, resource: str, ctl: dm.Control):
        self.ctl = ctl
        self.names = StackNames(resource)

    def dm(self, part: str) -> str:
        return self.names.top() if part == "top" else self.names.dm(part)

    def present(self) -> dict[str, bool]:
        return {part: self.ctl.exists(self.dm(part)) for part in PRIMARY_PARTS}

    @property
    def top_path(self) -> str:
        return self.names.mapper_path_top()

    def build(self, lay: PrimaryLayout, created: list[str]) -> None:
        sectors = blockdev.size_bytes(lay.disk) // SECTOR
        mirror, top = self.dm("mirror"), self.dm("top")
        self.ctl.create(mirror, self.names.uuid("mirror"))
        created.append(mirror)
        self.ctl.load(mirror, [Mirror(0, sectors, "core", (str(lay.region_sectors), "nosync"),
                                      ((lay.disk, 0), (lay.nbd, 0)))])
        info = self.ctl.resume(mirror)
        self.ctl.create(top, self.names.uuid("top"))
        created.append(top)
        self.ctl.load(top, [Era(0, sectors, lay.era_metadata, info.devno, lay.era_block_sectors)])
        self.ctl.resume(top)

    def teardown(self) -> list[str]:
        return dm.remove_tree(self.ctl, [self.dm("top"), self.dm("mirror")])

    def era(self) -> EraStatus:
        return EraStatus.parse(self.ctl.status(self.dm("top"))[0].text)

    def mirror(self) -> MirrorStatus:
        return MirrorStatus.parse(self.ctl.status(self.dm("mirror"))[0].text)

    def checkpoint(self, peer_checkpoint, commit) -> float:
        """The primary's half of a checkpoint: quiesce the top device (flush: every acknowledged
        write is on P and S), let the secondary switch (`peer_checkpoint`), persist (`commit`),
        resume.  Any failure resumes the top device and leaves the state where it was."""
        top = self.dm("top")

        def both():
            peer_checkpoint()
            commit()

        result = switch.run(self.ctl, switch.SwitchPlan(suspend=[top], load={}, resume=[top], commit=both))
        return result.pause_seconds
