"""The primary host's half: every write to the local disk P and, synchronously, to the secondary.

    consumer -> dmrepl-NAME        = era M <mirror> <block>     (what changed in which era)
             -> dmrepl-NAME-mirror = mirror core P /dev/nbdX    (reads from P; the NBD leg is S)

stack.py builds and tears down the two devices, takes the primary's half of
a checkpoint (suspend with flush: every acknowledged write is on P and S) and
swaps the mirror's table when the secondary is lost or back; sync.py is the
initial full copy, resync.py finds what a delta resync copies.  `Primary` ties
them to the resource's state file: the checkpoint number and the era each
checkpoint began, from which a delta resync starts.  It returns values; the
daemon and the CLI make text.
"""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

from dmrepl import private
from dmrepl.config import PrimaryConfig
from dmrepl.errors import DmreplError
from dmrepl.kernel import blockdev, dm, era, loop, mirrorlog
from dmrepl.kernel.errors import KernelError
from dmrepl.kernel.status import EraStatus
from dmrepl.ranges import merge
from dmrepl.roles.backing import check_unused, kind
from dmrepl.roles.primary import resync
from dmrepl.roles.primary.stack import PRIMARY_PARTS, PrimaryLayout, PrimaryStack
from dmrepl.roles.transitions import Role
from dmrepl.state import ResourceState, StateStore

MiB = 1 << 20
SECTOR = 512
MIN_ERA_METADATA_BYTES = 1 * MiB
RESYNC_LOG_FILE = "resync-log.img"
# Present from the primary's `up` to its `down`: left behind, the host stopped without one (a
# crash, a power loss) and may not hold the newest data any more (the other host may have taken
# over meanwhile).  roles/promotion.py reads it.
UP_MARK_FILE = "primary-up"


def stopped_uncleanly(resource_state_dir: str) -> bool:
    return os.path.exists(os.path.join(resource_state_dir, UP_MARK_FILE))



@dataclass(frozen=True)
class Devices:
    disk: str
    era_metadata: str
    loops: tuple[str, ...]
    resync_log: str = ""      # the mirror's disk log during a resync (a loop over a state-dir file)


@dataclass(frozen=True)
class ResyncBase:
    """Where a delta resync starts: the newest checkpoint both hosts hold and the era it began
    (era None: no usable history, every piece of the disk is compared), and byte ranges
    [offset, length] compared besides: what a failover rolled back or the consumer wrote there,
    and what the peer wrote of its own before it gave its writes up (`resolve --discard-my-data`)."""

    checkpoint: int | None
    era: int | None
    extra: tuple[tuple[int, int], ...] = ()

    def describe(self) -> str:
        if self.era is None:
            return "no common checkpoint in this host's history: every piece compared"
        what = f"written since checkpoint {self.checkpoint} (era {self.era})"
        if self.extra:
            what += f" and {sum(n for _o, n in self.extra) >> 10} KiB diverged on either host"
        return what


class Primary:
    """One resource's primary stack on this host."""

    def __init__(self, cfg: PrimaryConfig, ctl: dm.Control):
        self.cfg = cfg
        self.ctl = ctl
        self.stack = PrimaryStack(cfg.name, ctl)
        self.states = StateStore(cfg.resource_state_dir)

    @classmethod
    @contextmanager
    def open(cls, cfg: PrimaryConfig) -> Iterator["Primary"]:
        with dm.Control() as ctl:
            yield cls(cfg, ctl)

    @property
    def top_path(self) -> str:
        return self.stack.top_path

    def paths(self) -> list[tuple[str, str]]:
        return [("disk", self.cfg.disk), ("era metadata", self.cfg.era_metadata)]

    def state(self) -> ResourceState | None:
        return self.states.load()

    def is_up(self) -> bool:
        return any(self.stack.present().values())

    def nbd_in_use(self) -> int | None:
        """N of the /dev/nbdN the mirror uses (None: the stack is down or the leg dropped)."""
        return self.stack.nbd_index() if self.stack.present()["mirror"] else None

    def consumer_written_bytes(self) -> int | None:
        """Bytes the consumer wrote through the top device since it appeared (block statistics);
        None while it is not there."""
        try:
            return blockdev.io_bytes(self.top_path)[1]
        except OSError:
            return None

    def size_bytes(self) -> int:
        """The replicated device's length: the state's (a resize records it), else the disk's."""
        st = self.states.load()
        return st.size_bytes if st is not None and st.size_bytes else blockdev.size_bytes(self.cfg.disk)

    # -- up / down --------------------------------------------------------------

    def check(self) -> ResourceState | None:
        """Refuse bad input before anything is created; returns the saved state (None: first start)."""
        present = [self.stack.dm(p) for p, there in self.stack.present().items() if there]
        if present:
            raise DmreplError(f"resource {self.cfg.name} is already up ({', '.join(present)} exist)",
                              f"`dmrepl status {self.cfg.name}`; `dmrepl down {self.cfg.name}` first")
        for what, path in self.paths():
            kind(path, what)
            check_unused(what, path)
        size = self.size_bytes()
        disk = blockdev.size_bytes(self.cfg.disk)
        if disk < size:
            raise DmreplError(f"disk {self.cfg.disk} is {disk} bytes, less than the {size} bytes {self.cfg.name} has "
                              f"(recorded in {self.states.path})", "give the disk its size back; dmrepl never shrinks")
        era_block_bytes = self.cfg.era_block_sectors * 512
        if size < MiB or size % era_block_bytes:
            raise DmreplError(f"disk {self.cfg.disk} is {size} bytes: it must be at least 1 MiB and a multiple "
                              f"of the era block ({era_block_bytes} bytes)", "or choose a smaller era_block_kib")
        piece = resync.region_sectors(size) * 512
        if size % piece:
            raise DmreplError(f"disk {self.cfg.disk} is {size} bytes: it must be a multiple of {piece} bytes "
                              "(the piece a resync compares and copies)", "round the disk's size to that")
        if blockdev.size_bytes(self.cfg.era_metadata) < MIN_ERA_METADATA_BYTES:
            raise DmreplError(f"era metadata {self.cfg.era_metadata} is smaller than 1 MiB")
        st = self.states.load()
        if st is not None and st.resource_id != self.cfg.resource_id:
            raise DmreplError(f"state in {self.states.path} belongs to resource id {st.resource_id!r}, "
                              f"the config says {self.cfg.resource_id!r}",
                              "fix the config, or move the state directory away to start afresh")
        if st is not None and st.role != Role.PRIMARY:
            raise DmreplError(f"state in {self.states.path} is a {st.role}'s", "this host's config says primary")
        return st

    @property
    def resync_log_path(self) -> str:
        return os.path.join(self.cfg.resource_state_dir, RESYNC_LOG_FILE)

    def attach(self) -> Devices:
        """Block devices for the configured paths (themselves, or new loop devices over files) and
        a loop device for the resync's mirror log (a small file in the state directory)."""
        devs, loops = [], []
        regions = resync.regions(self.size_bytes(), resync.region_sectors(self.size_bytes()))
        private.ensure_dir(self.cfg.resource_state_dir)
        with private.open_file(self.resync_log_path, "ab") as f:
            f.truncate(mirrorlog.device_bytes(regions))
        try:
            for path in [p for _w, p in self.paths()] + [self.resync_log_path]:
                if os.path.isfile(path):
                    devs.append(loop.attach(path))
                    loops.append(devs[-1])
                else:
                    devs.append(path)
        except BaseException:
            self.detach(loops)
            raise
        return Devices(devs[0], devs[1], tuple(loops), devs[2])

    def adopt(self) -> tuple[Devices, int | None]:
        """The stack a daemon that died left behind, as it is: its loop devices (found, not attached
        again) and the index of the NBD device still in the mirror (None: the leg was dropped)."""
        st = self.state()
        if st is None or st.resource_id != self.cfg.resource_id or st.role != Role.PRIMARY:
            raise DmreplError(f"the devices of {self.cfg.name} are up but the state in {self.states.path} "
                              "is not this config's primary", f"`dmrepl down {self.cfg.name}` first")
        found, loops = [], []
        for what, path in self.paths() + [("resync log", self.resync_log_path)]:
            if not os.path.isfile(path):
                found.append(path)
                continue
            devs = loop.find(path)
            if not devs:
                raise DmreplError(f"{what} {path} is no longer attached to a loop device under the running stack",
                                  f"stop the consumer, `dmrepl down {self.cfg.name}`, then `up` again")
            found.append(devs[0])
            loops.append(devs[0])
        if not st.size_bytes:       # an older state: the live stack's length is the size
            with self.states.locked():
                self.states.save(self.states.load().evolve(size_bytes=blockdev.size_bytes(self.top_path)))
        return Devices(found[0], found[1], tuple(loops), found[2]), self.stack.nbd_index()

    def up(self, devs: Devices, nbd_path: str | None) -> ResourceState:
        """Build mirror and era over P and the NBD leg (None: without it, degraded); a first start
        formats the era metadata."""
        with self.states.locked():
            st = self.states.load()
            size = self.size_bytes()        # the state's, else (a first start, an older state) the disk's
            if st is None:
                era.format_metadata(devs.era_metadata)
                st = ResourceState(name=self.cfg.name, resource_id=self.cfg.resource_id, role=Role.PRIMARY.value)
            created: list[str] = []
            try:
                self.stack.build(PrimaryLayout(disk=devs.disk, nbd=nbd_path, era_metadata=devs.era_metadata,
                                               era_block_sectors=self.cfg.era_block_sectors, size_bytes=size),
                                 created)
                # The size the tables were built at, recorded now if the state had none.
                st = st.evolve(size_bytes=size,
                               history=st.history + [{"checkpoint": st.checkpoint, "era": self.stack.era().current_era,
                                                      "event": "up", "time": time.time()}])
                self.states.save(st)
                private.open_file(os.path.join(self.cfg.resource_state_dir, UP_MARK_FILE), "w").close()
            except BaseException:
                dm.remove_tree(self.ctl, list(reversed(created)))
                raise
        return st

    def refuse_while_open(self) -> None:
        top = self.stack.dm("top")
        if self.ctl.exists(top) and self.ctl.info(top).open_count:
            raise DmreplError(f"{self.top_path} is open ({self.ctl.info(top).open_count} opener(s))",
                              "stop the consumer first; replication goes on meanwhile")

    def down(self, devs: Devices | None = None) -> list[str]:
        """Remove the devices (refused while the top device is open) and detach our loop devices."""
        self.refuse_while_open()
        done = self.stack.teardown()
        files = [p for _w, p in self.paths() if os.path.isfile(p)] + [self.resync_log_path]
        loops = list(devs.loops) if devs else [d for p in files if os.path.isfile(p) for d in loop.find(p)]
        done += self.detach(loops)
        try:
            os.unlink(os.path.join(self.cfg.resource_state_dir, UP_MARK_FILE))
        except FileNotFoundError:
            pass
        return done

    @staticmethod
    def detach(loops: list[str]) -> list[str]:
        done = []
        for dev in loops:
            try:
                if loop.detach(dev):
                    done.append(dev)
            except KernelError:
                pass
        return done

    # -- checkpoints --------------------------------------------------------------

    def checkpoint(self, peer_checkpoint: Callable[[int], float]) -> tuple[ResourceState, float, float]:
        """Checkpoint n = saved + 1 on both hosts; returns (state, pause s, the secondary's pause s).

        The top device stays suspended while the secondary switches; n and the
        era that begins with it are saved before the resume.  A failure on either
        side resumes with the state at n-1 (dmrepl.kernel.switch).

        The era is read *before* the suspend: dm-era answers a status through
        its worker, which a suspend stops, so a status of a suspended era waits
        for the resume -- from the thread that is to resume it, forever, in D
        state (dm-era-target.c: era_status -> in_worker1; era_postsuspend ->
        stop_worker; docs/kernel-notes.md).  The resume usually starts the
        next era, but era.rst says not to assume it: the era recorded for n is the
        one current at its suspend, so that "written since n" is "written in that
        era or later" -- a superset by at most one checkpoint's writes, never less.
        """
        with self.states.locked():
            st = self.states.load()
            if st is None:
                raise DmreplError(f"resource {self.cfg.name} was never brought up on this host")
            n = st.checkpoint + 1
            era_before = self.stack.era().current_era
            peer_pause = []

            def peer():
                peer_pause.append(peer_checkpoint(n))

            def commit():
                nonlocal st
                # A checkpoint joins the hosts: what diverged before it is in both now.
                st = st.evolve(checkpoint=n, diverged=None,
                               history=st.history + [{"checkpoint": n, "era": era_before, "time": time.time()}])
                self.states.save(st)

            pause = self.stack.checkpoint(peer, commit)
        return st, pause, peer_pause[0] if peer_pause else 0.0

    def frozen(self, fn: Callable[[], None]) -> float:
        """`fn` runs while the consumer's writes wait (the top device suspended with flush): P and
        S hold the same acknowledged writes and none is in flight.  Returns the pause in seconds.
        No era status may be read inside `fn` (see `checkpoint`)."""
        return self.stack.frozen(fn)

    # -- losing the secondary, and resync ---------------------------------------------

    def mark_handover(self, handover: dict | None) -> None:
        """Record (or clear, None) a switchover whose outcome this host does not know yet."""
        with self.states.locked():
            self.states.save(self.states.load().evolve(handover=handover))

    def era_status(self) -> EraStatus:
        return self.stack.era()

    def grow(self, devs: Devices, size_bytes: int) -> ResourceState:
        """The leg dropped: the stack at `size_bytes` (the consumer sees it at the resume), the
        resync's log sized for its regions, the size recorded.  P must be that long already."""
        if os.path.isfile(self.cfg.disk):
            loop.set_capacity(devs.disk)
        disk = blockdev.size_bytes(devs.disk)
        if disk < size_bytes:
            raise DmreplError(f"disk {self.cfg.disk} is {disk} bytes, less than {size_bytes}")
        regions = resync.regions(size_bytes, resync.region_sectors(size_bytes))
        if os.path.getsize(self.resync_log_path) < mirrorlog.device_bytes(regions):
            with private.open_file(self.resync_log_path, "ab") as f:
                f.truncate(mirrorlog.device_bytes(regions))
            loop.set_capacity(devs.resync_log)
        with self.states.locked():
            st = self.states.load()
            new = st.evolve(size_bytes=size_bytes)
            self.stack.grow(devs.disk, devs.era_metadata, self.cfg.era_block_sectors, size_bytes,
                            commit=lambda: self.states.save(new), revert=lambda: self.states.save(st))
        return new

    def drop_leg(self, devs: Devices) -> None:
        self.stack.drop_leg(devs.disk, self.size_bytes())

    def add_leg(self, devs: Devices, nbd_path: str) -> None:
        self.stack.add_leg(devs.disk, nbd_path, self.size_bytes())

    def resync_base(self, their_checkpoints: list[int], their_diverged: list[list[int]] | None = None
                    ) -> ResyncBase:
        """The newest checkpoint both hold (the older of the two hosts' numbers: a secondary one
        ahead took a checkpoint this host did not record, which changes nothing it holds) and the
        earliest era this host recorded for it.

        After a failover this host's history begins at the takeover: its writes since are era
        `diverged["era"]` or later, the checkpoint's own differences are the failover's ranges, and
        the peer (the old primary) must say what it wrote since its own last checkpoint: it does
        once it gave its writes up (`their_diverged`).  Without that, every piece is compared."""
        st = self.state()
        if st is None or not their_checkpoints:
            return ResyncBase(None, None)
        common = min(st.checkpoint, max(their_checkpoints))
        mine = st.diverged or {}
        extra = tuple((int(o), int(n)) for o, n in [*(mine.get("ranges") or []), *(their_diverged or [])])
        if mine.get("era") is not None:
            return ResyncBase(common, mine["era"] if their_diverged is not None else None, extra)
        return ResyncBase(common, st.era_of(common), extra)

    def resync_candidates(self, devs: Devices, base: ResyncBase) -> tuple[int, list[tuple[int, int]]]:
        """(region sectors, region ranges) to compare: the era blocks written since the base's era,
        and the base's extra byte ranges."""
        size = self.size_bytes()
        region = resync.region_sectors(size)
        if base.era is None:
            return region, [(0, resync.regions(size, region))]
        blocks = era.written_since(self.ctl, self.stack.dm("top"), devs.era_metadata, base.era)
        ranges = resync.regions_of_blocks(blocks, self.cfg.era_block_sectors, region, size)
        extra = [(o // SECTOR, -(-(o + n) // SECTOR)) for o, n in base.extra]
        return region, merge(ranges, resync.regions_of_blocks(sorted(extra), 1, region, size))

    def start_recovery(self, devs: Devices, nbd_path: str, region: int, differing: list[int]) -> tuple[int, int]:
        """Let the kernel copy the differing regions; returns (event counter to wait on, regions)."""
        regions = resync.regions(self.size_bytes(), region)
        event_nr = self.stack.start_recovery(devs.disk, nbd_path, devs.resync_log,
                                             mirrorlog.Bitmap.with_zeros(regions, differing), region,
                                             self.size_bytes())
        return event_nr, regions

    def finish_recovery(self, devs: Devices, nbd_path: str, regions: int) -> frozenset[int]:
        return self.stack.finish_recovery(devs.disk, nbd_path, devs.resync_log, regions, self.size_bytes())

    # -- status -------------------------------------------------------------------

    def devices(self) -> dict:
        out = {}
        for part in PRIMARY_PARTS:
            name = self.stack.dm(part)
            if self.ctl.exists(name):
                info = self.ctl.info(name)
                out[part] = {"name": name, "path": info.path, "dev": info.devno, "open_count": info.open_count,
                             "suspended": info.suspended}
        return out

    def kernel_status(self) -> dict:
        """What the kernel says now: the mirror legs' health and the era (not while the top device is
        suspended: dm-era's status would wait for the resume, see `checkpoint`)."""
        infos = {}
        for part in PRIMARY_PARTS:
            name = self.stack.dm(part)
            infos[part] = self.ctl.info(name) if self.ctl.exists(name) else None
            if infos[part] is None or not infos[part].live_table:
                return {}   # not built yet (or being torn down): nothing to say
        m = self.stack.mirror()
        out: dict = {"mirror_health": m.health if m else None, "nbd_leg": "attached" if m else "dropped"}
        if m is not None and m.log_args[:1] == ("disk",):
            out["recovery"] = {"regions_in_sync": m.in_sync_regions, "regions": m.total_regions}
        if not infos["top"].suspended:
            out["era"] = self.stack.era().current_era
        return out
