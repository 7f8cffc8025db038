"""The secondary host's half: hidden/active overlay, checkpoint, failover, merge.

    primary's writes (NBD) -> dmrepl-NAME-origin  = snapshot-origin S
    consumer               -> dmrepl-NAME-active  = linear -> dmrepl-NAME-hidden = snapshot S Hk P chunk

One job per module: inputs.py (backing devices checked), stack.py (build,
find, tear down), checkpoint.py, failover.py (failover and merge), watch.py
(the store's fill level).  `Secondary` ties them to the resource's state file
under its lock; it returns values, the CLI turns them into text.

Crash safety: every switch writes the state *between* the table load and the
resume (dmrepl.kernel.switch), so that after a power loss at any point `up`
rebuilds the stack on the store whose contents match S.
"""

from __future__ import annotations

import functools
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator

from dmrepl.config import SecondaryConfig
from dmrepl.errors import DmreplError
from dmrepl.kernel import blockdev, dm
from dmrepl.names import SECONDARY_PARTS
from dmrepl.roles.secondary import checkpoint as _checkpoint
from dmrepl.roles.secondary import failover as _failover
from dmrepl.roles.secondary import grow as _grow
from dmrepl.roles.secondary import inputs, watch
from dmrepl.roles.secondary.failover import MergeProgress
from dmrepl.roles.secondary.stack import Deferred, Stack
from dmrepl.roles.secondary.watch import StoreHealth
from dmrepl.roles.transitions import Role
from dmrepl.state import ResourceState, StateStore

__all__ = ["Secondary", "SecondaryStatus", "DeviceStatus", "MergeProgress", "StoreHealth", "Deferred"]


def _locked(method):
    """Run a state-changing operation under the resource's state lock (daemon and CLI both write)."""
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with self.states.locked():
            return method(self, *args, **kwargs)
    return wrapper


@dataclass(frozen=True)
class DeviceStatus:
    part: str
    name: str
    path: str
    dev: str
    open_count: int
    suspended: bool
    deferred_remove: bool
    targets: list[str]
    link: str | None = None


@dataclass(frozen=True)
class SecondaryStatus:
    name: str
    resource_id: str
    up: bool
    state: ResourceState | None
    store_path: str | None
    devices: list[DeviceStatus] = field(default_factory=list)
    deferred: list[Deferred] = field(default_factory=list)
    store: StoreHealth | None = None
    merge: MergeProgress | None = None


class Secondary:
    """One resource's secondary stack on this host."""

    def __init__(self, cfg: SecondaryConfig, ctl: dm.Control):
        self.cfg = cfg
        self.ctl = ctl
        self.stack = Stack(cfg, ctl)
        self.states = StateStore(cfg.resource_state_dir)

    @classmethod
    @contextmanager
    def open(cls, cfg: SecondaryConfig) -> Iterator["Secondary"]:
        """A Secondary with its own device-mapper control handle, closed afterwards."""
        with dm.Control() as ctl:
            yield cls(cfg, ctl)

    # -- what is there ----------------------------------------------------------

    @property
    def active_path(self) -> str:
        return self.stack.names.mapper_path("active")

    @property
    def origin_path(self) -> str:
        return self.stack.names.mapper_path("origin")

    @property
    def link_path(self) -> str:
        return self.stack.names.link("active")

    def origin_device(self) -> str:
        """/dev/dm-N of the origin: made by the kernel (devtmpfs), unlike udev's /dev/mapper name."""
        return self.ctl.info(self.stack.dm("origin")).dm_path

    def is_up(self) -> bool:
        return self.stack.is_up()

    def active_openers(self) -> int:
        return self.stack.active_openers()

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

    # -- up / down --------------------------------------------------------------

    @_locked
    def up(self) -> ResourceState:
        """Build the stack from disk, for the role the state file records."""
        pending = self.stack.deferred()
        if pending:
            raise DmreplError(f"the last stack of resource {self.cfg.name} is not gone yet: "
                              + "; ".join(d.describe() for d in pending),
                              "stop the consumer that still holds it, then run `up` again")
        present = [self.stack.dm(p) for p, there in self.stack.present().items() if there]
        if present:
            raise DmreplError(f"resource {self.cfg.name} is already up ({', '.join(present)} exist)",
                              f"`dmrepl secondary status {self.cfg.name}`; `down` first to rebuild it")
        inputs.check(self.cfg)
        st = self.states.load()
        if st is not None and st.resource_id != self.cfg.resource_id:
            raise DmreplError(f"state in {self.states.path} belongs to resource id {st.resource_id!r}, "
                              f"the config says {self.cfg.resource_id!r}",
                              "fix the config, or move the state directory away to start afresh")
        attached: list[str] = []
        created: list[str] = []
        try:
            b = self.stack.attach(attached)
            if st is None:
                # A first start: both stores begin empty, whatever they held.
                for store in b.stores:
                    self.stack.zero_header(store)
                st = ResourceState(name=self.cfg.name, resource_id=self.cfg.resource_id,
                                   size_bytes=blockdev.size_bytes(b.disk))
                self.states.save(st)
            era_meta = None
            if st.role != Role.SECONDARY and (st.diverged or {}).get("era") is not None \
                    and self.cfg.era_metadata is not None:
                era_meta = self.stack.era_metadata_device(attached)   # the failover's era goes on
            if not st.size_bytes:       # an older state: record the size the tables are built at
                st = st.evolve(size_bytes=self.stack.sectors(b.disk) * 512)
                self.states.save(st)
            self.stack.build(b, Role(st.role), st.current_store, created, era_meta)
        except BaseException:
            self.stack.remove(created, attached)
            raise
        health = watch.store_health(self.stack)
        if health is not None and health.lost and not st.checkpoint_lost:
            st = st.evolve(checkpoint_lost=True)
            self.states.save(st)
        return st

    def down(self, *, force: bool = False) -> list[str]:
        """Remove the stack and detach its loop devices; the state stays for the next `up`.

        Returns one line per thing done; a device whose removal the kernel
        defers (forced while open) is reported as such, with its holders.
        """
        openers = self.stack.active_openers()
        if openers and not force:
            raise DmreplError(f"{self.active_path} is open ({openers} opener(s))",
                              "stop the consumer first, or use --force (it then gets I/O errors)")
        return self.stack.teardown(force=force)

    # -- the role's operations ----------------------------------------------------

    @_locked
    def checkpoint(self, number: int | None = None) -> tuple[ResourceState, float]:
        """Switch the hidden snapshot to the other, empty store; returns (state, pause seconds)."""
        return _checkpoint.checkpoint(self.stack, self.states, self._require_up(), number)

    @_locked
    def finish_interrupted_switch(self) -> list[str]:
        """After a process died inside a checkpoint's switch: the state file's checkpoint, live and
        resumed (what was done, one line each; nothing if no switch was interrupted)."""
        return _checkpoint.finish_interrupted(self.stack, self._require_state())

    @_locked
    def failover(self, fence: Callable[[], None] | None = None) -> ResourceState:
        """Take over: fence the primary, merge the hidden store into S under the active device."""
        return _failover.failover(self.stack, self.states, self._require_up(), fence)

    @_locked
    def grow(self, size_bytes: int) -> ResourceState:
        """The stack at the primary's new length (grow.py); the state as it is after."""
        return _grow.grow(self.stack, self.states, self._require_up(), size_bytes)

    @_locked
    def shrink_back(self) -> ResourceState:
        """Undo a grow the primary did not follow (grow.py)."""
        return _grow.shrink_back(self.stack, self.states, self._require_up())

    def merge_progress(self) -> MergeProgress | None:
        return _failover.merge_progress(self.stack, self._require_state())

    @_locked
    def finish_merge(self) -> ResourceState:
        return _failover.finish_merge(self.stack, self.states, self._require_up())

    def wait_merge(self, progress: Callable[[MergeProgress], None] | None = None,
                   timeout: float | None = None) -> ResourceState:
        """Wait for the merge (kernel events on the origin), then finish it."""
        origin = self.stack.dm("origin")
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
            self.ctl.wait_event(origin, self.ctl.info(origin).event_nr, timeout=0.2)

    def store_data_bytes(self) -> int:
        """Bytes the current hidden store holds beyond its header: written since the last checkpoint."""
        return watch.store_data_bytes(self.stack)

    def store_health(self) -> StoreHealth | None:
        return watch.store_health(self.stack)

    @_locked
    def watch_store(self) -> tuple[ResourceState, StoreHealth | None]:
        return watch.watch_store(self.stack, self.states, self._require_state())

    # -- status -------------------------------------------------------------------

    def status(self) -> SecondaryStatus:
        st = self.states.load()
        up = self.is_up()
        devices = []
        for part in SECONDARY_PARTS:
            name = self.stack.dm(part)
            if not self.ctl.exists(name):
                continue
            info = self.ctl.info(name)
            link = self.stack.names.link(part)
            devices.append(DeviceStatus(part=part, name=name, path=info.path, dev=info.devno,
                                        open_count=info.open_count, suspended=info.suspended,
                                        deferred_remove=info.deferred_remove,
                                        targets=[t.target_type for t in self.ctl.table(name)] if info.live_table
                                        else [],
                                        link=link if part == "active" and os.path.exists(link) else None))
        store = self.store_health() if up and st is not None else None
        merge = self.merge_progress() if up and st is not None and st.role == Role.MERGING else None
        return SecondaryStatus(name=self.cfg.name, resource_id=self.cfg.resource_id, up=up, state=st,
                               store_path=self.cfg.hidden_stores[st.current_store] if st else None,
                               devices=devices, deferred=self.stack.deferred(), store=store, merge=merge)
