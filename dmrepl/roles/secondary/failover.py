"""Failover on the secondary: take over at once, merge the hidden store in the background.

Fence the primary (the caller's callback: stop the NBD export); one switch
loads origin as snapshot-merge on the current store -- loaded while the
snapshot on that store exists, it takes over its exceptions at resume
(dm-snap.c: snapshot handover) -- and re-points active to the origin.  The
consumer's view does not change by a byte.  When the kernel reports the merge
done (sectors_allocated == metadata_sectors), a second switch makes the origin
linear over S and the store is discarded.

For the failback (the old primary returns as secondary and gets only what
differs): with era metadata configured, active is re-pointed to a new era
device over the origin, so every write from the takeover on is recorded; and
the store's exception table -- every chunk the merge rolls back to the
checkpoint or the consumer wrote -- is read while the stack is suspended, before
the merge consumes it, and kept in the state (`diverged`).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Callable

from dmrepl.errors import DmreplError
from dmrepl.kernel import cowstore, dm, era, loop, switch
from dmrepl.kernel.status import SnapshotStatus
from dmrepl.kernel.tables import Linear
from dmrepl.names import StackNames
from dmrepl.roles.secondary import watch
from dmrepl.roles.secondary.stack import SECTOR, Stack
from dmrepl.roles.transitions import Op, Role, check, is_noop
from dmrepl.state import ResourceState, StateStore


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


def failover(stack: Stack, states: StateStore, st: ResourceState,
             fence: Callable[[], None] | None = None) -> ResourceState:
    check(stack.cfg.name, st.role, Op.FAILOVER)
    if is_noop(st.role, Op.FAILOVER):
        return st  # already switched: the merge goes on
    # Given up, not yet replaced: a mix.  Nothing given up (a handover: the last checkpoint held
    # every write) leaves the view at that checkpoint.
    # A grown range not yet compared is no mix: no checkpoint held it (the old range is the checkpoint's).
    grown = (st.diverged or {}).get("grown_from") is not None
    if st.diverged is not None and st.diverged.get("ranges") and st.role == Role.SECONDARY and not grown:
        raise DmreplError("this host gave its writes up (`resolve --discard-my-data`) and its resync from the "
                          "primary has not reached a checkpoint yet: its view is not a checkpoint, a failover "
                          "now would take over a mix of both hosts' data",
                          "let the resync finish (`dmrepl status` on the primary), or fail over on the other host")
    health = watch.store_health(stack)
    if health is not None and health.lost:
        raise DmreplError("the hidden store was invalidated by the kernel (checkpoint lost): "
                          "the standby view is gone and cannot be merged",
                          "a resync from the primary is needed")
    if fence is not None:
        fence()
    b = stack.backing()
    active, hidden, origin = stack.dm("active"), stack.dm("hidden"), stack.dm("origin")
    status = SnapshotStatus.parse(stack.ctl.status(hidden)[0].text)
    entry = {"failover_from_checkpoint": st.checkpoint, "time": time.time(),
             "merge_bytes": status.data_sectors * SECTOR}
    attached: list[str] = []
    created: list[str] = []
    lower = "origin"
    if stack.cfg.era_metadata is not None:
        try:
            meta = stack.era_metadata_device(attached)
            era.format_metadata(meta)     # a new history: the takeover's writes from era 1 on
            entry["era"] = stack.create_era(b, meta, created)
        except BaseException:
            stack.remove(created, attached)
            raise
        lower = "era"

    def commit():
        # Suspended: the store's table is complete on disk and the merge has not begun.
        table = cowstore.read(b.stores[st.current_store])
        ranges = [list(r) for r in table.extents_bytes()] if table is not None else []
        if grown:       # the grown range holds this disk's own bytes: a failback compares it too
            ranges += [list(r) for r in st.diverged["ranges"]]
        diverged = {"checkpoint": st.checkpoint, "ranges": ranges, **({"era": entry["era"]} if "era" in entry else {})}
        new_state.append(st.evolve(role=Role.MERGING.value, history=[*st.history, entry], diverged=diverged))
        states.save(new_state[-1])

    new_state: list[ResourceState] = []
    try:
        switch.run(stack.ctl, switch.SwitchPlan(
            suspend=[active, hidden, origin],
            load={origin: stack.merge_table(b, st.current_store), active: stack.over(lower, b)},
            resume=[origin, active],
            resume_old=[hidden, origin, active],
            commit=commit,
            revert=lambda: states.save(st)))
    except BaseException:
        dm.remove_tree(stack.ctl, list(reversed(created)))
        stack.remove([], attached)
        raise
    # The old snapshot handed its store over and now fails all I/O; nobody uses it.
    stack.ctl.remove(hidden)
    return new_state[-1]


def merge_progress(stack: Stack, st: ResourceState) -> MergeProgress | None:
    origin = stack.dm("origin")
    if st.role != Role.MERGING or not stack.ctl.exists(origin):
        return None
    spec = stack.ctl.status(origin)[0]
    if spec.target_type != "snapshot-merge":
        return None
    status = SnapshotStatus.parse(spec.text)
    if status.state == "merge_failed":
        raise DmreplError("the kernel reports 'Merge failed' on the origin",
                          "check the kernel log; the disk and the store are kept as they are")
    total = next((h.get("merge_bytes", 0) for h in reversed(st.history) if "merge_bytes" in h), 0)
    return MergeProgress(remaining_bytes=status.data_sectors * SECTOR, total_bytes=total, done=status.merge_done)


def finish_merge(stack: Stack, states: StateStore, st: ResourceState) -> ResourceState:
    """Once the merge is complete: origin becomes linear over S, the store is discarded."""
    check(stack.cfg.name, st.role, Op.FINISH_MERGE)
    if is_noop(st.role, Op.FINISH_MERGE):
        return st
    progress = merge_progress(stack, st)
    if progress is None or not progress.done:
        raise DmreplError("the merge is still running", "wait for it: `dmrepl secondary failover NAME`")
    b = stack.backing()
    active, origin = stack.dm("active"), stack.dm("origin")
    new = st.evolve(role=Role.PRIMARY.value)
    switch.run(stack.ctl, switch.SwitchPlan(
        suspend=[active, origin],
        load={origin: [Linear(0, stack.sectors(b.disk), b.disk, 0)]},
        resume=[origin, active],
        commit=lambda: states.save(new),
        revert=lambda: states.save(st)))
    stack.discard_store(b.stores[st.current_store])
    return new


def runs_taken_over(name: str, disk: str, state_dir: str, ctl: dm.Control) -> bool:
    """Whether this host failed over and still runs the secondary's stack over `disk`: with both
    roles' sections the state says "primary" from the end of the merge on, while the stack stays
    the secondary's until a `down` and an `up` as primary."""
    st = StateStore(state_dir).load()
    marks = [h for h in (st.history if st else []) if "failover_from_checkpoint" in h or h.get("event") == "up"]
    if not marks or "failover_from_checkpoint" not in marks[-1]:
        return False
    # By the disk under the origin, not by names alone: two "hosts" in one test VM share them.
    disks = {os.stat(d).st_rdev for d in ([disk] if not os.path.isfile(disk) else loop.find(disk))}
    origin = StackNames(name).dm("origin")
    return ctl.exists(origin) and any(os.makedev(*dev) in disks for dev in ctl.deps(origin))
