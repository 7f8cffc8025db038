"""The hidden store's fill level, from the kernel's snapshot status.

A store that fills up invalidates the snapshot (all its I/O then fails): the
standby view is lost.  Above `store_fill_warn` the state asks for an early
checkpoint; an invalidated store is recorded as a lost checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass

from dmrepl.kernel.status import SnapshotStatus
from dmrepl.roles.secondary.stack import SECTOR, Stack
from dmrepl.roles.transitions import Op, allowed
from dmrepl.state import ResourceState, StateStore


@dataclass(frozen=True)
class StoreHealth:
    state: str                 # valid, invalid, overflow, ...
    allocated_bytes: int       # 0 when the kernel no longer reports it (invalid store)
    total_bytes: int
    fill: float
    over_threshold: bool

    @property
    def lost(self) -> bool:
        return self.state != "valid"


def store_data_bytes(stack: Stack) -> int:
    """The chunks the current store holds (the exceptions: allocated less the header's sectors)."""
    name = stack.dm("hidden")
    if not stack.ctl.exists(name) or not stack.ctl.info(name).live_table:
        return 0
    spec = stack.ctl.status(name)[0]
    if spec.target_type != "snapshot":
        return 0
    status = SnapshotStatus.parse(spec.text)
    return max(0, status.allocated_sectors - status.metadata_sectors) * SECTOR


def store_health(stack: Stack) -> StoreHealth | None:
    name = stack.dm("hidden")
    if not stack.ctl.exists(name) or not stack.ctl.info(name).live_table:
        return None
    spec = stack.ctl.status(name)[0]
    if spec.target_type != "snapshot":
        return None
    status = SnapshotStatus.parse(spec.text)
    return StoreHealth(state=status.state, allocated_bytes=status.allocated_sectors * SECTOR,
                       total_bytes=status.total_sectors * SECTOR, fill=status.fill_fraction,
                       over_threshold=status.valid and status.fill_fraction >= stack.cfg.store_fill_warn)


def watch_store(stack: Stack, states: StateStore, st: ResourceState) -> tuple[ResourceState, StoreHealth | None]:
    """Record in the state what the store's fill level asks for; returns both."""
    health = store_health(stack)
    if health is None or not allowed(st.role, Op.WATCH_STORE):
        return st, health
    if health.lost and not st.checkpoint_lost:
        st = st.evolve(checkpoint_lost=True)
        states.save(st)
    elif health.over_threshold and not st.early_checkpoint_requested:
        st = st.evolve(early_checkpoint_requested=True)
        states.save(st)
    return st, health
