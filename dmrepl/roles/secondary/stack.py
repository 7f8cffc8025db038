"""The secondary's devices: build them for the recorded role, find them again, tear them down.

    role secondary:  origin = snapshot-origin S;  hidden = snapshot S Hk P chunk;  active = linear -> hidden
    role merging:    origin = snapshot-merge S Hk P chunk (a merge cut short by a crash goes on);  active -> origin
    role primary:    origin = linear S;  active -> origin

With era metadata configured (a host with both roles' sections), the failover
puts era over origin and active over era: every write of the host that took
over is recorded from the first, so that the failback copies only what changed.

Stacked tables name lower devices by MAJOR:MINOR: a /dev/mapper name is
udev's to create and may lag behind (docs/kernel-notes.md).
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass

from dmrepl.config import SecondaryConfig
from dmrepl.errors import DmreplError
from dmrepl.kernel import blockdev, dm, era, loop, procfs, udev
from dmrepl.kernel.errors import BlockDeviceError, KernelError
from dmrepl.kernel.tables import Era, Error, Linear, Snapshot, SnapshotMerge, SnapshotOrigin
from dmrepl.names import SECONDARY_PARTS, StackNames
from dmrepl.roles.secondary import inputs
from dmrepl.roles.transitions import Role
from dmrepl.state import StateStore

SECTOR = 512
HEADER_BYTES = 4096  # a persistent store's header lives in its first chunk (dm-snap-persistent.c)


@dataclass(frozen=True)
class Backing:
    """Block devices under a stack: the disk S and the two hidden stores (a file's is its loop device)."""

    disk: str
    stores: tuple[str, str]


@dataclass(frozen=True)
class Deferred:
    """A device whose removal the kernel defers until its last opener closes it."""

    name: str
    holders: list[tuple[int, str]]   # (pid, command)

    def describe(self) -> str:
        return f"{self.name}: removal deferred until {procfs.describe(self.holders)} closes it"


class Stack:
    """One resource's secondary devices on this host; the kernel is the source of truth."""

    def __init__(self, cfg: SecondaryConfig, ctl: dm.Control):
        self.cfg = cfg
        self.ctl = ctl
        self.names = StackNames(cfg.name)

    def dm(self, part: str) -> str:
        return self.names.dm(part)

    # -- what is there ----------------------------------------------------------

    def present(self) -> dict[str, bool]:
        return {part: self.ctl.exists(self.dm(part)) for part in SECONDARY_PARTS}

    def deferred(self) -> list[Deferred]:
        out = []
        for part in SECONDARY_PARTS:
            name = self.dm(part)
            if self.ctl.exists(name):
                info = self.ctl.info(name)
                if info.deferred_remove:
                    try:
                        holders = procfs.openers(info.dm_path, include_self=True)
                    except FileNotFoundError:
                        holders = []
                    out.append(Deferred(name, holders))
        return out

    def is_up(self) -> bool:
        pending = {d.name for d in self.deferred()}
        return any(there and self.dm(part) not in pending for part, there in self.present().items())

    def active_openers(self) -> int:
        name = self.dm("active")
        if not self.ctl.exists(name):
            return 0
        info = self.ctl.info(name)
        return 0 if info.deferred_remove else info.open_count

    def backing(self) -> Backing:
        """The block devices of a stack that is up; a clear error if one went away under it."""
        found = []
        hint = f"bring it down (`dmrepl secondary down {self.cfg.name} --force`), fix the path, and up again"
        for what, path in inputs.backing_paths(self.cfg):
            if not os.path.exists(path):
                raise DmreplError(f"{what} {path} is gone (moved or deleted under the running stack of "
                                  f"{self.cfg.name})", hint)
            if not os.path.isfile(path):
                found.append(path)
                continue
            devs = loop.find(path)
            if not devs:
                raise DmreplError(f"{what} {path} is no longer attached to a loop device: the stack of "
                                  f"{self.cfg.name} lost its backing device", hint)
            found.append(devs[0])
        return Backing(found[0], (found[1], found[2]))

    def sectors(self, disk_dev: str) -> int:
        """The replicated device's length: the state's (a resize records it), else the disk's."""
        st = StateStore(self.cfg.resource_state_dir).load()
        if st is not None and st.size_bytes:
            return st.size_bytes // SECTOR
        return blockdev.size_bytes(disk_dev) // SECTOR

    # -- tables and stores ------------------------------------------------------

    def hidden_table(self, b: Backing, store: int, sectors: int | None = None) -> list:
        return [Snapshot(0, sectors or self.sectors(b.disk), b.disk, b.stores[store], "P", self.cfg.chunk_sectors)]

    def merge_table(self, b: Backing, store: int) -> list:
        return [SnapshotMerge(0, self.sectors(b.disk), b.disk, b.stores[store], "P", self.cfg.chunk_sectors)]

    def over(self, lower_part: str, b: Backing, sectors: int | None = None) -> list:
        """The active device's table: linear over origin, hidden or era, by number."""
        return [Linear(0, sectors or self.sectors(b.disk), self.ctl.info(self.dm(lower_part)).devno, 0)]

    def era_metadata_device(self, attached: list[str]) -> str:
        """The era metadata's block device (a new loop device over a file, added to `attached`)."""
        path = self.cfg.era_metadata
        if not os.path.isfile(path):
            return path
        found = loop.find(path)
        if found:
            return found[0]
        attached.append(loop.attach(path))
        return attached[-1]

    def create_era(self, b: Backing, metadata_dev: str, created: list[str]) -> int:
        """era over origin (the taken-over host's writes); returns the era current from now on."""
        name = self.dm("era")
        self.ctl.create(name, self.names.uuid("era"))
        created.append(name)
        self.ctl.load(name, [Era(0, self.sectors(b.disk), metadata_dev, self.ctl.info(self.dm("origin")).devno,
                                 self.cfg.era_block_sectors)])
        self.ctl.resume(name)
        return era.status(self.ctl, name).current_era

    @staticmethod
    def zero_header(store_dev: str) -> None:
        blockdev.write_at(store_dev, 0, bytes(HEADER_BYTES))

    @staticmethod
    def discard_store(store_dev: str) -> None:
        """Forget a store's contents: header zeroed, blocks discarded where supported."""
        Stack.zero_header(store_dev)
        try:
            blockdev.discard(store_dev, 0, blockdev.size_bytes(store_dev))
        except BlockDeviceError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.ENOTTY, errno.EINVAL):
                raise

    # -- build and tear down ----------------------------------------------------

    def attach(self, attached: list[str]) -> Backing:
        """Block devices for the configured paths: themselves, or new loop devices over files."""
        devs = []
        for _what, path in inputs.backing_paths(self.cfg):
            if os.path.isfile(path):
                devs.append(loop.attach(path))
                attached.append(devs[-1])
            else:
                devs.append(path)
        return Backing(devs[0], (devs[1], devs[2]))

    def build(self, b: Backing, role: Role, store: int, created: list[str], era_metadata: str | None = None) -> None:
        """Create origin (and hidden, or era over a failover's `era_metadata`) and active for `role`;
        names go to `created` as they appear."""
        sectors = self.sectors(b.disk)

        def create(part: str, table: list) -> None:
            self.ctl.create(self.dm(part), self.names.uuid(part))
            created.append(self.dm(part))
            self.ctl.load(self.dm(part), table)

        if role == Role.SECONDARY:
            create("origin", [SnapshotOrigin(0, sectors, b.disk)])
            create("hidden", self.hidden_table(b, store))
            # The snapshot must be active before the origin takes writes
            # (dm-snap.c: __origin_write skips snapshots not yet resumed).
            self.ctl.resume(self.dm("hidden"))
            self.ctl.resume(self.dm("origin"))
            lower = "hidden"
        elif role == Role.MERGING:
            # A merge interrupted by a crash resumes from the persistent store.
            create("origin", self.merge_table(b, store))
            self.ctl.resume(self.dm("origin"))
            lower = "origin"
        else:
            create("origin", [Linear(0, sectors, b.disk, 0)])
            self.ctl.resume(self.dm("origin"))
            lower = "origin"
        if role != Role.SECONDARY and era_metadata is not None:
            self.create_era(b, era_metadata, created)
            lower = "era"
        create("active", self.over(lower, b))
        info = self.ctl.resume(self.dm("active"))
        if udev.running() and udev.rules_installed():
            # Consumers open the stable name: it must exist when `up` returns.
            link = self.names.link("active")
            if not udev.wait_for_link(link, info.major, info.minor):
                raise DmreplError(f"udev did not create {link} within 10 s",
                                  f"check that {udev.RULES_NAME} is installed and udevd runs")

    def remove(self, names: list[str], loops: list[str]) -> None:
        """Undo a build that failed: whatever was created, in reverse order."""
        try:
            dm.remove_tree(self.ctl, list(reversed(names)))
        finally:
            for dev in loops:
                try:
                    loop.detach(dev)
                except KernelError:
                    pass

    def teardown(self, *, force: bool) -> list[str]:
        """Remove the devices and detach the loop devices; one line per thing done.

        Forced while the active device is open, that device gets an error table
        and a deferred removal: its holder sees I/O errors, and the kernel
        removes it when the holder closes it (dm.c: dm_blk_close).
        """
        active = self.dm("active")
        loops = self._loops_under()
        if force and self.active_openers():
            info = self.ctl.info(active)
            sectors = sum(s.length for s in self.ctl.table(active)) if info.live_table else 1
            self.ctl.suspend(active, flush=False)
            self.ctl.load(active, [Error(0, sectors)])
            self.ctl.resume(active)
            self.ctl.remove(active, deferred=True)
        pending = self.deferred()
        done = [d.describe() for d in pending]
        skip = {d.name for d in pending}
        top_down = [self.dm(p) for p in ("active", "era", "hidden", "origin")]
        done += dm.remove_tree(self.ctl, [n for n in top_down if n not in skip])
        for dev in loops:
            done.append(dev if loop.detach(dev) else f"{dev}: detach pending until its last opener closes it")
        return done

    def _loops_under(self) -> list[str]:
        """The loop devices this resource attached: over its configured files, and those its live
        tables use (a file renamed under a running stack is found by number, not by name)."""
        if not all(os.path.isfile(p) or not os.path.exists(p) for _w, p in inputs.backing_paths(self.cfg)):
            return []  # block devices: the admin's, never detached by us
        paths = [p for _w, p in inputs.backing_paths(self.cfg)] + [self.cfg.era_metadata or ""]
        found = [dev for path in paths if os.path.isfile(path) for dev in loop.find(path)]
        for part in ("origin", "hidden", "era"):
            name = self.dm(part)
            if self.ctl.exists(name) and self.ctl.info(name).live_table:
                for major, minor in self.ctl.deps(name):
                    dev = loop.by_devno(major, minor)
                    if dev is not None:
                        found.append(dev)
        return list(dict.fromkeys(found))
