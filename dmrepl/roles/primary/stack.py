"""The primary's devices: a mirror of P and the NBD leg, era over it.

The mirror is built without handle_errors: a write that fails on the NBD leg is
completed from P and the leg is marked failed ("D" in the status), so that a
dead secondary stalls the consumer for at most the NBD timeout instead of
holding writes until userspace suspends the mirror (DESIGN.md section 3).
Reads go to the first leg, P.  The initial sync is done by dmrepl before the
mirror is built, so the mirror starts "nosync".

The "mirror" device changes its table, never its name or device number (era
above it holds that number), with the link's fate:

    replicating   mirror core <R> nosync P nbd     every write on both legs
    degraded      linear P                          the NBD leg dropped; era records the writes
    resyncing     mirror disk <L> <Rr> P nbd        the kernel copies the regions L marks
                                                    (region locks: never an older copy over a
                                                    newer write), then core nosync again

Each change is one suspend/load/resume of the mirror alone: era's bios wait in
dm core meanwhile, era itself stays live (its messages and status need that).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from dmrepl.errors import DmreplError
from dmrepl.kernel import blockdev, dm, mirrorlog, switch
from dmrepl.kernel.status import EraStatus, MirrorStatus
from dmrepl.kernel.tables import Era, Linear, Mirror
from dmrepl.names import StackNames

SECTOR = 512
REGION_SECTORS = 1024         # the replicating mirror's region (512 KiB)
PRIMARY_PARTS = ("mirror", "top")


@dataclass(frozen=True)
class PrimaryLayout:
    """What the primary's stack is built from (block devices) and how."""

    disk: str                 # P
    nbd: str | None           # /dev/nbdN: the secondary's disk S over NBD (None: start degraded)
    era_metadata: str         # a small device for dm-era's metadata
    era_block_sectors: int    # change-tracking granularity
    region_sectors: int = REGION_SECTORS
    size_bytes: int | None = None   # the replicated device's length (None: the disk's)


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
        sectors = (lay.size_bytes or blockdev.size_bytes(lay.disk)) // SECTOR
        mirror, top = self.dm("mirror"), self.dm("top")
        self.ctl.create(mirror, self.names.uuid("mirror"))
        created.append(mirror)
        self.ctl.load(mirror, [Mirror(0, sectors, "core", (str(lay.region_sectors), "nosync"),
                                      ((lay.disk, 0), (lay.nbd, 0))) if lay.nbd else Linear(0, sectors, lay.disk, 0)])
        info = self.ctl.resume(mirror)
        self.ctl.create(top, self.names.uuid("top"))
        created.append(top)
        self.ctl.load(top, [Era(0, sectors, lay.era_metadata, info.devno, lay.era_block_sectors)])
        self.ctl.resume(top)

    def teardown(self) -> list[str]:
        return dm.remove_tree(self.ctl, [self.dm("top"), self.dm("mirror")])

    def era(self) -> EraStatus:
        return EraStatus.parse(self.ctl.status(self.dm("top"))[0].text)

    def mirror(self) -> MirrorStatus | None:
        """The mirror's status; None while the NBD leg is dropped (a linear table)."""
        (spec,) = self.ctl.status(self.dm("mirror"))
        return MirrorStatus.parse(spec.text) if spec.target_type == "mirror" else None

    def nbd_index(self) -> int | None:
        """N of the /dev/nbdN the mirror's table uses (None: no NBD leg), by the kernel's name for it."""
        for major, minor in self.ctl.deps(self.dm("mirror")):
            name = os.path.basename(os.path.realpath(f"/sys/dev/block/{major}:{minor}"))
            if name.startswith("nbd") and name[3:].isdigit():
                return int(name[3:])
        return None

    def _swap(self, target) -> dm.DeviceInfo:
        name = self.dm("mirror")
        self.ctl.suspend(name)
        try:
            self.ctl.load(name, [target])
        finally:
            info = self.ctl.resume(name)
        return info

    def drop_leg(self, disk: str, size_bytes: int) -> None:
        """Writes to P only from now on (the suspend waits for the NBD leg's in-flight writes:
        at most the NBD timeout, after which the kernel fails them)."""
        self._swap(Linear(0, size_bytes // SECTOR, disk, 0))

    @staticmethod
    def _replicating(disk: str, nbd: str, size_bytes: int) -> Mirror:
        return Mirror(0, size_bytes // SECTOR, "core", (str(REGION_SECTORS), "nosync"), ((disk, 0), (nbd, 0)))

    def add_leg(self, disk: str, nbd: str, size_bytes: int) -> None:
        """Every write on both legs again; what differs from before is the resync's to copy."""
        self._swap(self._replicating(disk, nbd, size_bytes))

    def start_recovery(self, disk: str, nbd: str, log_dev: str, bitmap: mirrorlog.Bitmap,
                       region_sectors: int, size_bytes: int) -> int:
        """Load a disk-log mirror whose log marks the regions to copy; returns the event counter
        to wait on (the kernel raises one event when the last region is in sync)."""
        name = self.dm("mirror")
        self.ctl.suspend(name)
        try:
            mirrorlog.write(log_dev, bitmap)
            self.ctl.load(name, [Mirror(0, size_bytes // SECTOR, "disk",
                                        (log_dev, str(region_sectors)), ((disk, 0), (nbd, 0)))])
            event_nr = self.ctl.info(name).event_nr
        finally:
            self.ctl.resume(name)
        return event_nr

    def finish_recovery(self, disk: str, nbd: str, log_dev: str, regions: int, size_bytes: int) -> frozenset[int]:
        """Back to core nosync once the log says every region was copied.  Returns the regions the
        log still marks (empty: done).  The log is read after the suspend and again after the resume
        that destroyed the disk-log table (its last flush may come that late:
        docs/resync-research.md, late-write rule); a leg flush that failed clears every bit."""
        name = self.dm("mirror")
        self.ctl.suspend(name)
        try:
            zeros = mirrorlog.read(log_dev, regions).out_of_sync
            if not zeros:
                self.ctl.load(name, [self._replicating(disk, nbd, size_bytes)])
        finally:
            self.ctl.resume(name)
        return zeros or mirrorlog.read(log_dev, regions).out_of_sync

    def grow(self, disk: str, era_metadata: str, era_block_sectors: int, size_bytes: int, commit, revert) -> None:
        """The leg dropped (mirror linear over P): mirror and era at `size_bytes`, `commit` between
        load and resume.  Era is suspended before its new table is loaded (each era table opens the
        metadata on its own) and checks no length below it: the mirror grows in the same switch
        (docs/kernel-notes.md, "Growing the stacks in place")."""
        top, mirror = self.dm("top"), self.dm("mirror")
        sectors = size_bytes // SECTOR
        switch.run(self.ctl, switch.SwitchPlan(
            suspend=[top, mirror],
            load={mirror: [Linear(0, sectors, disk, 0)],
                  top: [Era(0, sectors, era_metadata, self.ctl.info(mirror).devno, era_block_sectors)]},
            resume=[mirror, top], commit=commit, revert=revert))

    def frozen(self, fn) -> float:
        """Run `fn` with the top device suspended with flush (every acknowledged write on P and S,
        none in flight), then resume; returns the pause.  A failure of `fn` resumes too."""
        top = self.dm("top")
        return switch.run(self.ctl, switch.SwitchPlan(suspend=[top], load={}, resume=[top], commit=fn)).pause_seconds

    def checkpoint(self, peer_checkpoint, commit) -> float:
        """The primary's half of a checkpoint: quiesce the top device (flush: every acknowledged
        write is on P and S), let the secondary switch (`peer_checkpoint`), persist (`commit`),
        resume.  Any failure resumes the top device and leaves the state where it was."""
        top = self.dm("top")

        def both():
            # The suspend flushed every write; one the NBD leg failed meanwhile was completed from
            # P alone (no handle_errors) and marked the leg: S lacks it, so S must not take a view.
            m = self.mirror()
            if m is not None and len(m.health) > 1 and m.health[1] != "A":
                raise DmreplError(f"the NBD leg failed while the checkpoint flushed the writes (mirror health "
                                  f"{m.health}): the secondary lacks some of them",
                                  "no checkpoint was taken; the leg is dropped and a resync follows")
            peer_checkpoint()
            commit()

        result = switch.run(self.ctl, switch.SwitchPlan(suspend=[top], load={}, resume=[top], commit=both))
        return result.pause_seconds
