"""Checkpoint n on the secondary: the standby view becomes the disk's current data.

One switch (dmrepl.kernel.switch): suspend active, hidden, origin; reload
hidden on the other store H(1-k), whose header was zeroed first; persist the
state; resume hidden, origin, active.  Then discard the old store.  Reloading
on the *same* store would keep its in-memory exceptions (DESIGN.md section 3),
hence two stores used in turn.  The pause is a handful of ioctls.
"""

from __future__ import annotations

import time

from dmrepl.errors import DmreplError
from dmrepl.kernel import switch
from dmrepl.roles.secondary.stack import Stack
from dmrepl.roles.transitions import Op, check
from dmrepl.state import ResourceState, StateStore


def checkpoint(stack: Stack, states: StateStore, st: ResourceState,
               number: int | None = None) -> tuple[ResourceState, float]:
    """Returns the new state and the pause (first suspend to last resume) in seconds.

    `number` is the primary's checkpoint number when the primary asks; it may
    equal the current one (the primary retries a checkpoint it could not
    record: the view is taken again, at the primary's present), never be older.
    """
    check(stack.cfg.name, st.role, Op.CHECKPOINT)
    n = st.checkpoint + 1 if number is None else number
    if n < st.checkpoint:
        raise DmreplError(f"checkpoint {n} asked, this secondary holds checkpoint {st.checkpoint} already",
                          "the two hosts' histories differ: compare `status` on both")
    b = stack.backing()
    k, nxt = st.current_store, 1 - st.current_store
    stack.zero_header(b.stores[nxt])
    new = st.evolve(checkpoint=n, current_store=nxt, checkpoint_lost=False, diverged=None,
                    early_checkpoint_requested=False,
                    history=[*st.history, {"checkpoint": n, "time": time.time()}])
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
