"""The secondary host's half: hidden/active overlay, checkpoint, failover, merge.

    primary's writes (NBD) -> dmrepl-NAME-origin  = snapshot-origin S
    consumer               -> dmrepl-NAME-active  = linear -> dmrepl-NAME-hidden = snapshot S Hk P chunk

The hidden store Hk (k = 0/1, alternating per checkpoint) holds the
checkpoint-time contents of every chunk the primary overwrote since, plus the
consumer's own writes; the active view is the last checkpoint plus those
writes.  A checkpoint switches the hidden snapshot to the other, zeroed store
(reloading on the same store would keep its exceptions: DESIGN.md section 3).
A failover hands the store to snapshot-merge on the origin and re-points
active to it; when the merge ends the origin becomes linear over S.

Crash safety: the state file (role, checkpoint, current store) is written
*between* the table load and the resume, so that after a power loss at any
point `up` rebuilds the stack on the store whose contents match S.

This module is policy: it uses only dmrepl.kernel; processes (the NBD export)
belong to the daemon layer and reach it through the `fence` callback.
"""

from __future__ import annotations

import errno
import functools
import os
import stat
import time
from dataclasses import dataclass
from typing import Callable

from dmrepl.config import SecondaryConfig
from dmrepl.errors import DmreplError
from dmrepl.kernel import blockdev, dm, loop, procfs, udev
from dmrepl.kernel.errors import BlockDeviceError, KernelError
from dmrepl.kernel.tables import Error, Linear, Snapshot, SnapshotMerge, SnapshotOrigin, SnapshotStatus
from dmrepl.state import MERGING, PRIMARY, SECONDARY, ResourceState, StateStore

MiB = 1 << 20
SECTOR = 512
MIN_DISK_BYTES = 1 * MiB
MIN_STORE_BYTES = 1 * MiB
HEADER_BYTES = 4096  # a persistent store's header lives in its first chunk (dm-snap-persistent.c)


def _locked(method):
    """Run a state-changing operation under the resource's state lock."""
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with self.states.locked():
            return method(self, *args, **kwargs)
    return wrapper


def device_names(name: str) -> dict[str, str]:
    return {part: f"dmrepl-{name}-{part}" for part in ("origin", "hidden", "active")}


def device_uuid(name: str, part: str) -> str:
    return f"{dm.UUID_PREFIX}{name}-{part}"


@dataclass(frozen=True)
class StoreHealth:
    """Fill level of the current hidden store, from the kernel's snapshot status."""

    state: str                 # valid, invalid, overflow, ...
    allocated_bytes: int
    total_bytes: int
    fill: float
    over_threshold: bool

    @property
    def lost(self) -> bool:
        return self.state != "valid"


@dataclass(frozen=True)
class MergeProgress:
    remaining_bytes: int
    total_bytes: int
    done: bool

    @property
    def fraction(self) -> float:
        if self.done or not self.total_bytes:
            return 1.0
        return max(0.0, 1.0 - self.remaining_bytes / self.total_bytes)


def _openers(path: str) -> list[tuple[int, str]]:
    try:
        return procfs.openers(path, include_self=True)
    except FileNotFoundError:
        return []


def describe_deferred(name: str, holders: list[tuple[int, str]]) -> str:
    who = ", ".join(f"{comm}[{pid}]" for pid, comm in holders) or "a process"
    return f"{name}: removal deferred until {who} closes it"


def _kind(path: str, what: str) -> str:
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


class Secondary:
    """One resource's secondary stack on this host."""

    def __init__(self, cfg: SecondaryConfig, ctl: dm.Control):
        self.cfg = cfg
        self.ctl = ctl
        self.names = device_names(cfg.name)
        self.states = StateStore(cfg.resource_state_dir)

    # -- what is there ----------------------------------------------------------

    def present(self) -> dict[str, bool]:
        return {part: self.ctl.exists(n) for part, n in self.names.items()}

    def deferred(self) -> dict[str, list[tuple[int, str]]]:
        """Devices whose removal the kernel defers until their last opener closes them,
        with the processes holding them: {dm name: [(pid, command), ...]}."""
        out = {}
        for name in self.names.values():
            if self.ctl.exists(name):
                info = self.ctl.info(name)
                if info.deferred_remove:
                    out[name] = _openers(info.dm_path)
        return out

    def is_up(self) -> bool:
        pending = self.deferred()
        return any(there and self.names[part] not in pending for part, there in self.present().items())

    def state(self) -> ResourceState | None:
        return self.states.load()

    def _require_state(self) -> ResourceState:
        st = self.states.load()
        if st is None:
            raise DmreplError(f"resource {self.cfg.name} was never brought up on this host",
                              f"run `dmrepl secondary up {self.cfg.name}`")
        return st

    def _require_up(self) -> ResourceState:
        st = self._require_state()
        if not self.is_up():
            raise DmreplError(f"resource {self.cfg.name} is not up", f"run `dmrepl secondary up {self.cfg.name}`")
        return st

    @property
    def active_path(self) -> str:
        return f"/dev/mapper/{self.names['active']}"

    @property
    def link_path(self) -> str:
        """The stable name udev gives the active device (udev/56-dmrepl.rules)."""
        return f"/dev/dmrepl/{self.cfg.name}/active"

    @property
    def origin_path(self) -> str:
        return f"/dev/mapper/{self.names['origin']}"

    # -- backing devices ------------------------------------------------------

    def _paths(self) -> list[tuple[str, str]]:
        return [("disk", self.cfg.disk), ("hidden store 0", self.cfg.hidden_stores[0]),
                ("hidden store 1", self.cfg.hidden_stores[1])]

    def _check_inputs(self) -> None:
        """Refuse bad backing devices before touching anything."""
        kinds = {what: _kind(path, what) for what, path in self._paths()}
        if len(set(kinds.values())) != 1:
            desc = ", ".join(f"{w} is a {'file' if k == 'file' else 'block device'}" for w, k in kinds.items())
            raise DmreplError(f"the disk and the hidden stores must be of one kind: {desc}",
                              "use image files for all three, or block devices for all three")
        disk_bytes = blockdev.size_bytes(self.cfg.disk)
        chunk_bytes = self.cfg.chunk_sectors * SECTOR
        if disk_bytes < MIN_DISK_BYTES or disk_bytes % chunk_bytes:
            raise DmreplError(f"disk {self.cfg.disk} is {disk_bytes} bytes: it must be at least "
                              f"{MIN_DISK_BYTES} bytes and a multiple of the chunk size ({chunk_bytes} bytes)")
        for i, store in enumerate(self.cfg.hidden_stores):
            size = blockdev.size_bytes(store)
            if size < MIN_STORE_BYTES:
                raise DmreplError(f"hidden store {i} {store} is {size} bytes: it must be at least "
                                  f"{MIN_STORE_BYTES} bytes", "size a store for the writes expected "
                                  "between two checkpoints (both stores alike)")
        for what, path in self._paths():
            self._check_unused(what, path)

    def _check_unused(self, what: str, path: str) -> None:
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
            who = ", ".join(f"{comm}[{pid}]" for pid, comm in users)
            raise DmreplError(f"{what} {path} is open by {who}", "stop those processes first")

    def _block(self, path: str, attached: list[str]) -> str:
        """The block device for a configured path: itself, or a new loop device over the file."""
        if os.path.isfile(path):
            dev = loop.attach(path)
            attached.append(dev)
            return dev
        return path

    def _loops_of_ours(self) -> list[str]:
        out = []
        for _what, path in self._paths():
            if os.path.isfile(path):
                out += loop.find(path)
        return out

    # -- tables ---------------------------------------------------------------

    def _sectors(self, disk_dev: str) -> int:
        return blockdev.size_bytes(disk_dev) // SECTOR

    def _hidden_table(self, disk_dev: str, store_dev: str, sectors: int) -> list:
        return [Snapshot(0, sectors, disk_dev, store_dev, "P", self.cfg.chunk_sectors)]

    def _zero_header(self, store_dev: str) -> None:
        blockdev.write_at(store_dev, 0, bytes(HEADER_BYTES))

    def _discard_store(self, store_dev: str) -> None:
        """Forget a store's contents: header zeroed, blocks discarded where supported."""
        self._zero_header(store_dev)
        try:
            blockdev.discard(store_dev, 0, blockdev.size_bytes(store_dev))
        except BlockDeviceError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.ENOTTY, errno.EINVAL):
                raise

    def _devs(self) -> tuple[str, tuple[str, str]]:
        """Block devices of disk and stores for a stack that is up (a file's is its loop device)."""
        disk = self.cfg.disk if not os.path.isfile(self.cfg.disk) else loop.find(self.cfg.disk)[0]
        stores = tuple(s if not os.path.isfile(s) else loop.find(s)[0] for s in self.cfg.hidden_stores)
        return disk, stores  # type: ignore[return-value]

    # -- up / down ------------------------------------------------------------

    @_locked
    def up(self) -> ResourceState:
        """Build the stack from disk, for the role the state file records."""
        pending = self.deferred()
        if pending:
            raise DmreplError("the last stack of resource " + self.cfg.name + " is not gone yet: "
                              + "; ".join(describe_deferred(n, h) for n, h in pending.items()),
                              "stop the consumer that still holds it, then run `up` again")
        present = [self.names[part] for part, there in self.present().items() if there]
        if present:
            raise DmreplError(f"resource {self.cfg.name} is already up ({', '.join(present)} exist)",
                              f"`dmrepl secondary status {self.cfg.name}`; `down` first to rebuild it")
        self._check_inputs()
        st = self.states.load()
        if st is not None and st.resource_id != self.cfg.resource_id:
            raise DmreplError(f"state in {self.states.path} belongs to resource id {st.resource_id!r}, "
                              f"the config says {self.cfg.resource_id!r}",
                              "fix the config, or move the state directory away to start afresh")
        attached: list[str] = []
        created: list[str] = []
        try:
            disk = self._block(self.cfg.disk, attached)
            stores = [self._block(s, attached) for s in self.cfg.hidden_stores]
            sectors = self._sectors(disk)
            if st is None:
                # A first start: both stores begin empty, whatever they held.
                for s in stores:
                    self._zero_header(s)
                st = ResourceState(name=self.cfg.name, resource_id=self.cfg.resource_id)
                self.states.save(st)
            k = st.current_store
            n = self.names

            def create(part: str) -> str:
                self.ctl.create(n[part], device_uuid(self.cfg.name, part))
                created.append(n[part])
                return n[part]

            if st.role == SECONDARY:
                create("origin")
                self.ctl.load(n["origin"], [SnapshotOrigin(0, sectors, disk)])
                create("hidden")
                self.ctl.load(n["hidden"], self._hidden_table(disk, stores[k], sectors))
                # The snapshot must be active before the origin takes writes
                # (dm-snap.c: __origin_write skips snapshots not yet resumed).
                self.ctl.resume(n["hidden"])
                self.ctl.resume(n["origin"])
                # Stacked devices are named by number: a /dev/mapper name is udev's
                # to create and may lag behind (docs/kernel-notes.md).
                lower = self.ctl.info(n["hidden"]).devno
            elif st.role == MERGING:
                # A merge interrupted by a crash resumes from the persistent store.
                create("origin")
                self.ctl.load(n["origin"], [SnapshotMerge(0, sectors, disk, stores[k], "P",
                                                          self.cfg.chunk_sectors)])
                self.ctl.resume(n["origin"])
                lower = self.ctl.info(n["origin"]).devno
            else:
                create("origin")
                self.ctl.load(n["origin"], [Linear(0, sectors, disk, 0)])
                self.ctl.resume(n["origin"])
                lower = self.ctl.info(n["origin"]).devno
            create("active")
            self.ctl.load(n["active"], [Linear(0, sectors, lower, 0)])
            info = self.ctl.resume(n["active"])
            if udev.running() and udev.rules_installed():
                # Consumers open the stable name: it must exist when `up` returns.
                if not udev.wait_for_link(self.link_path, info.major, info.minor):
                    raise DmreplError(f"udev did not create {self.link_path} within 10 s",
                                      f"check that {udev.RULES_NAME} is installed and udevd runs")
        except BaseException:
            self._teardown(created, attached)
            raise
        health = self.store_health()
        if health is not None and health.lost and not st.checkpoint_lost:
            st = st.evolve(checkpoint_lost=True)
            self.states.save(st)
        return st

    def _teardown(self, names: list[str], loops: list[str]) -> None:
        try:
            dm.remove_tree(self.ctl, reversed(names))
        finally:
            for dev in loops:
                try:
                    loop.detach(dev)
                except KernelError:
                    pass

    def active_openers(self) -> int:
        name = self.names["active"]
        if not self.ctl.exists(name):
            return 0
        info = self.ctl.info(name)
        return 0 if info.deferred_remove else info.open_count

    def down(self, *, force: bool = False) -> list[str]:
        """Remove the stack and detach its loop devices; the state stays for the next `up`.

        Returns what was done, one line per device; a device whose removal the
        kernel defers (forced while open) is reported as such, with its holders.
        """
        n = self.names
        openers = self.active_openers()
        if openers and not force:
            raise DmreplError(f"{self.active_path} is open ({openers} opener(s))",
                              "stop the consumer first, or use --force (it then gets I/O errors)")
        if openers:
            # Forced: the consumer keeps an fd on a device that now fails all I/O,
            # and the kernel removes it when that fd is closed.
            info = self.ctl.info(n["active"])
            sectors = sum(s.length for s in self.ctl.table(n["active"])) if info.live_table else 1
            self.ctl.suspend(n["active"], flush=False)
            self.ctl.load(n["active"], [Error(0, sectors)])
            self.ctl.resume(n["active"])
            self.ctl.remove(n["active"], deferred=True)
        pending = self.deferred()
        removed = [describe_deferred(name, holders) for name, holders in pending.items()]
        names = [n["active"], n["hidden"], n["origin"]]
        removed += dm.remove_tree(self.ctl, [x for x in names if x not in pending])
        for dev in self._loops_of_ours():
            if loop.detach(dev):
                removed.append(dev)
            else:
                removed.append(f"{dev}: detach pending until its last opener closes it")
        return removed

    # -- checkpoint -----------------------------------------------------------

    @_locked
    def checkpoint(self) -> tuple[ResourceState, float]:
        """Switch the hidden snapshot to the other, empty store; returns (state, pause seconds)."""
        st = self._require_up()
        if st.role != SECONDARY:
            raise DmreplError(f"resource {self.cfg.name} is {st.role}: checkpoints are taken only "
                              "on a secondary", "a failover is in progress or done")
        n = self.names
        disk, stores = self._devs()
        k, nxt = st.current_store, 1 - st.current_store
        sectors = self._sectors(disk)
        self._zero_header(stores[nxt])
        new_state = st.evolve(checkpoint=st.checkpoint + 1, current_store=nxt, checkpoint_lost=False,
                              early_checkpoint_requested=False,
                              history=[*st.history, {"checkpoint": st.checkpoint + 1, "time": time.time()}])
        t0 = time.perf_counter()
        suspended: list[str] = []
        loaded = False
        try:
            for part in ("active", "hidden", "origin"):
                self.ctl.suspend(n[part])
                suspended.append(n[part])
            self.ctl.load(n["hidden"], self._hidden_table(disk, stores[nxt], sectors))
            loaded = True
            self.states.save(new_state)
        except BaseException:
            if loaded:
                self.ctl.clear(n["hidden"])
            for name in (n["hidden"], n["origin"], n["active"]):
                if name in suspended:
                    self.ctl.resume(name)
            raise
        for part in ("hidden", "origin", "active"):
            self.ctl.resume(n[part])
        pause = time.perf_counter() - t0
        self._discard_store(stores[k])
        return new_state, pause

    # -- failover and merge -----------------------------------------------------

    @_locked
    def failover(self, fence: Callable[[], None] | None = None) -> ResourceState:
        """Take over: fence the primary, merge the hidden store into S under the active device."""
        st = self._require_up()
        if st.role == MERGING:
            return st  # already switched: the merge goes on
        if st.role != SECONDARY:
            raise DmreplError(f"resource {self.cfg.name} is {st.role}: nothing to fail over")
        health = self.store_health()
        if health is not None and health.lost:
            raise DmreplError("the hidden store was invalidated by the kernel (checkpoint lost): "
                              "the standby view is gone and cannot be merged",
                              "a resync from the primary is needed")
        if fence is not None:
            fence()
        n = self.names
        disk, stores = self._devs()
        k = st.current_store
        sectors = self._sectors(disk)
        status = SnapshotStatus.parse(self.ctl.status(n["hidden"])[0].text)
        new_state = st.evolve(role=MERGING, history=[*st.history, {
            "failover_from_checkpoint": st.checkpoint, "time": time.time(),
            "merge_bytes": status.data_sectors * SECTOR}])
        suspended: list[str] = []
        loaded: list[str] = []
        try:
            for part in ("active", "hidden", "origin"):
                self.ctl.suspend(n[part])
                suspended.append(n[part])
            # snapshot-merge loaded while the snapshot on the same store exists
            # takes over its exceptions at resume (dm-snap.c: snapshot handover).
            self.ctl.load(n["origin"], [SnapshotMerge(0, sectors, disk, stores[k], "P", self.cfg.chunk_sectors)])
            loaded.append(n["origin"])
            self.ctl.load(n["active"], [Linear(0, sectors, self.ctl.info(n["origin"]).devno, 0)])
            loaded.append(n["active"])
            self.states.save(new_state)
        except BaseException:
            for name in loaded:
                self.ctl.clear(name)
            for name in (n["hidden"], n["origin"], n["active"]):
                if name in suspended:
                    self.ctl.resume(name)
            raise
        self.ctl.resume(n["origin"])
        self.ctl.resume(n["active"])
        # The old snapshot handed its store over and now fails all I/O; nobody uses it.
        self.ctl.remove(n["hidden"])
        return new_state

    def merge_progress(self) -> MergeProgress | None:
        st = self._require_state()
        if st.role != MERGING or not self.ctl.exists(self.names["origin"]):
            return None
        spec = self.ctl.status(self.names["origin"])[0]
        if spec.target_type != "snapshot-merge":
            return None
        status = SnapshotStatus.parse(spec.text)
        if status.state == "merge_failed":
            raise DmreplError("the kernel reports 'Merge failed' on the origin",
                              "check the kernel log; the disk and the store are kept as they are")
        total = next((h.get("merge_bytes", 0) for h in reversed(st.history) if "merge_bytes" in h), 0)
        return MergeProgress(remaining_bytes=status.data_sectors * SECTOR, total_bytes=total,
                             done=status.merge_done)

    @_locked
    def finish_merge(self) -> ResourceState:
        """Once the merge is complete: origin becomes linear over S, the store is discarded."""
        st = self._require_up()
        if st.role != MERGING:
            return st
        progress = self.merge_progress()
        if progress is None or not progress.done:
            raise DmreplError("the merge is still running", "wait for it: `dmrepl secondary failover NAME`")
        n = self.names
        disk, stores = self._devs()
        sectors = self._sectors(disk)
        self.ctl.suspend(n["active"])
        try:
            self.ctl.suspend(n["origin"])
            try:
                self.ctl.load(n["origin"], [Linear(0, sectors, disk, 0)])
                new_state = st.evolve(role=PRIMARY)
                self.states.save(new_state)
            finally:
                self.ctl.resume(n["origin"])
        finally:
            self.ctl.resume(n["active"])
        self._discard_store(stores[st.current_store])
        return new_state

    def wait_merge(self, progress: Callable[[MergeProgress], None] | None = None,
                   timeout: float | None = None) -> ResourceState:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            p = self.merge_progress()
            if p is None:
                return self._require_state()
            if progress is not None:
                progress(p)
            if p.done:
                return self.finish_merge()
            if deadline is not None and time.monotonic() > deadline:
                raise DmreplError("the merge did not finish in time", "it goes on in the kernel; wait again")
            info = self.ctl.info(self.names["origin"])
            self.ctl.wait_event(self.names["origin"], info.event_nr, timeout=0.2)

    # -- watching -------------------------------------------------------------

    def store_health(self) -> StoreHealth | None:
        name = self.names["hidden"]
        if not self.ctl.exists(name) or not self.ctl.info(name).live_table:
            return None
        spec = self.ctl.status(name)[0]
        if spec.target_type != "snapshot":
            return None
        status = SnapshotStatus.parse(spec.text)
        return StoreHealth(state=status.state, allocated_bytes=status.allocated_sectors * SECTOR,
                           total_bytes=status.total_sectors * SECTOR, fill=status.fill_fraction,
                           over_threshold=status.valid and status.fill_fraction >= self.cfg.store_fill_warn)

    @_locked
    def watch_store(self) -> tuple[ResourceState, StoreHealth | None]:
        """Record in the state what the store's fill level asks for; returns both."""
        st = self._require_state()
        health = self.store_health()
        if health is None or st.role != SECONDARY:
            return st, health
        if health.lost and not st.checkpoint_lost:
            st = st.evolve(checkpoint_lost=True)
            self.states.save(st)
        elif health.over_threshold and not st.early_checkpoint_requested:
            st = st.evolve(early_checkpoint_requested=True)
            self.states.save(st)
        return st, health

    def status(self) -> dict:
        st = self.states.load()
        present = self.present()
        pending = self.deferred()
        out: dict = {"name": self.cfg.name, "resource_id": self.cfg.resource_id, "up": self.is_up(),
                     "devices": {}, "warnings": [], "deferred_removal": [
                         {"name": n, "holders": [{"pid": pid, "command": comm} for pid, comm in h]}
                         for n, h in pending.items()]}
        for part, name in self.names.items():
            if not present[part]:
                continue
            info = self.ctl.info(name)
            out["devices"][part] = {"name": name, "path": f"/dev/mapper/{name}", "dev": f"{info.major}:{info.minor}",
                                    "open_count": info.open_count, "suspended": info.suspended,
                                    "deferred_remove": info.deferred_remove}
        if present["active"] and os.path.exists(self.link_path):
            out["devices"]["active"]["link"] = self.link_path
        if st is None:
            out["role"] = None
            return out
        out.update(role=st.role, checkpoint=st.checkpoint, current_store=st.current_store,
                   store_path=self.cfg.hidden_stores[st.current_store],
                   checkpoint_lost=st.checkpoint_lost, early_checkpoint_requested=st.early_checkpoint_requested)
        health = self.store_health() if out["up"] else None
        if health is not None:
            out["store"] = {"state": health.state, "allocated_bytes": health.allocated_bytes,
                            "total_bytes": health.total_bytes, "fill": round(health.fill, 4),
                            "warn_at": self.cfg.store_fill_warn}
            if health.lost or st.checkpoint_lost:
                out["warnings"].append("CHECKPOINT LOST: the kernel invalidated the hidden store; "
                                       "the standby view is gone, a resync is needed")
            elif health.over_threshold:
                out["warnings"].append(f"hidden store {health.fill:.0%} full (warn at "
                                       f"{self.cfg.store_fill_warn:.0%}): early checkpoint requested")
        if st.role == MERGING and out["up"]:
            p = self.merge_progress()
            if p is not None:
                out["merge"] = {"remaining_bytes": p.remaining_bytes, "total_bytes": p.total_bytes,
                                "fraction": round(p.fraction, 4), "done": p.done}
        return out
