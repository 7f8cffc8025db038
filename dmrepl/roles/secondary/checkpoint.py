"""Checkpoint n on the secondary: the standby view becomes the disk's current data.

One switch (dmrepl.kernel.switch): suspend active, hidden, origin; reload
hidden on the other store H(1-k), whose header was zeroed first; persist the
state; resume hidden, origin, active.  Then discard the old store.  Reloading
on the *same* store would keep its in-memory exceptions (DESIGN.md section 3),
hence two stores used in turn.  The pause is a handful of ioctls.
"""

from __future__ import annotations

import time

from dmrepl.kernel import switch
from dmrepl.roles.secondary.stack import Stack
from dmrepl.roles.transitions import Op, check
from dmrepl.state import ResourceState, StateStore


def checkpoint(stack: Stack, states: StateStore, st: ResourceState) -> tuple[ResourceState, float]:
    """Returns the new state and the pause (first suspend to last resume) in seconds."""
    check(stack.cfg.name, st.role, Op.CHECKPOINT)
    b = stack.backing()
    k, nxt = st.current_store, 1 - st.current_store
    stack.zero_header(b.stores[nxt])
    new = st.evolve(checkpoint=st.checkpoint + 1, current_store=nxt, checkpoint_lost=False,
                    early_checkpoint_requested=False,
                    history=[*st.history, {"checkpoint": st.checkpoint + 1, "time": time.time()}])
    active, hidden, origin = stack.dm("active"), stack.dm("hidden"), stack.dm("origin")
    result = switch.run(stack.ctl, switch.SwitchPlan(
        suspend=[active, hidden, origin],
        load={hidden: stack.hidden_table(b, nxt)},
        # Resume order: the snapshot before the origin (dm-snap.c: __origin_write
        # skips snapshots not yet resumed), the consumer's view last.
        resume=[hidden, origin, active],
        commit=lambda: states.save(new),
        revert=lambda: states.save(st)))
    stack.discard_store(b.stores[k])
    return new, result.pause_seconds
