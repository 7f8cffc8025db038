"""`dmrepl resize` on the secondary: its stack at the primary's new length.

The primary asks over the control link (GROW {size}) while it replicates, before it grows its
own stack.  The disk must have grown to exactly that size first (a loop device over a file is
told its file's new size here: LOOP_SET_CAPACITY, which works under a dm table).  One switch
reloads hidden (the same store: its exceptions are handed over), origin and active at the new
length; hidden resumes before origin, so that a write into the new range is copied into the
store first -- grown the other way round, the standby view would not hold it
(docs/kernel-notes.md, "Growing the stacks in place").  Committed with the switch: the new size
and the new range as `diverged` -- the standby view holds no checkpoint of that range until the
primary's resync has compared it and a checkpoint joined the hosts.  A power loss before the
commit leaves the old size (tables are built at the state's size, not the disk's).
"""

from __future__ import annotations

import os

from dmrepl.errors import DmreplError
from dmrepl.kernel import blockdev, loop, switch
from dmrepl.kernel.tables import SnapshotOrigin
from dmrepl.roles.secondary.stack import SECTOR, Stack
from dmrepl.roles.transitions import Role
from dmrepl.state import ResourceState, StateStore


def grow(stack: Stack, states: StateStore, st: ResourceState, size_bytes: int) -> ResourceState:
    name = stack.cfg.name
    if st.role != Role.SECONDARY:
        raise DmreplError(f"resource {name} is {st.role} on this host: only a secondary grows on the primary's word")
    b = stack.backing()
    old = blockdev.size_bytes(stack.ctl.info(stack.dm("origin")).dm_path)    # the live table's length
    if size_bytes == old:
        return st
    if size_bytes < old:
        raise DmreplError(f"resource {name} is {old} bytes here: shrinking to {size_bytes} is not supported")
    if st.diverged is not None or st.checkpoint_lost:
        raise DmreplError("this host's standby view is not a checkpoint yet (a resync has not ended, or the "
                          "hidden store was invalidated)", "let the primary's resync end first, then resize")
    if os.path.isfile(stack.cfg.disk):
        loop.set_capacity(b.disk)
    disk = blockdev.size_bytes(b.disk)
    if disk != size_bytes:
        raise DmreplError(f"this host's disk {stack.cfg.disk} is {disk} bytes, the primary's new size {size_bytes}",
                          "grow it to exactly the primary's size first (lvextend, truncate), then resize again")
    new = st.evolve(size_bytes=size_bytes, diverged={"checkpoint": st.checkpoint, "ranges": [[old, size_bytes - old]],
                                                     "grown_from": old})
    _switch(stack, b, states, st, new)
    return new


def shrink_back(stack: Stack, states: StateStore, st: ResourceState) -> ResourceState:
    """Undo a grow the primary did not follow (its hello still says the old size): the stack at
    that size again, the new range forgotten.  Nothing was written there but by this host's
    standby consumer, whose writes a checkpoint would have dropped anyway."""
    old = (st.diverged or {}).get("grown_from")
    if old is None:
        return st
    new = st.evolve(size_bytes=old, diverged=None)
    _switch(stack, stack.backing(), states, st, new)
    return new


def _switch(stack: Stack, b, states: StateStore, st: ResourceState, new: ResourceState) -> None:
    """hidden, origin and active at `new`'s size in one switch; `new` committed with it."""
    sectors = new.size_bytes // SECTOR
    active, hidden, origin = stack.dm("active"), stack.dm("hidden"), stack.dm("origin")
    switch.run(stack.ctl, switch.SwitchPlan(
        suspend=[active, hidden, origin],
        load={hidden: stack.hidden_table(b, st.current_store, sectors),
              origin: [SnapshotOrigin(0, sectors, b.disk)],
              active: stack.over("hidden", b, sectors)},
        resume=[hidden, origin, active],      # the snapshot first: see the module's docstring
        commit=lambda: states.save(new),
        revert=lambda: states.save(st)))
