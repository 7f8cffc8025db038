"""Checkpoint n on the secondary: the standby view becomes the disk's current data.

One switch (dmrepl.kernel.switch): suspend active, hidden, origin; reload
hidden on the other store H(1-k), whose header was zeroed first; persist the
state; resume hidden, origin, active.  Then discard the old store.  Reloading
on the *same* store would keep its in-memory exceptions (DESIGN.md section 3),
hence two stores used in turn.  The pause is a handful of ioctls.
"""

from __future__ import annotations

import os
import time

from dmrepl.errors import DmreplError
from dmrepl.kernel import switch
from dmrepl.kernel.tables import SnapshotOrigin
from dmrepl.roles.secondary.stack import Stack
from dmrepl.roles.transitions import Op, Role, check
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


def finish_interrupted(stack: Stack, st: ResourceState) -> list[str]:
    """A process that died inside a checkpoint's (or a resize's) switch -- between its first suspend
    and its last resume -- leaves active, hidden or origin suspended (reading the view would hang),
    maybe with next tables loaded.  The state file is the switch's commit, so it decides: the store
    and the size it names go live (a loaded table if it is that one, else loaded now), any other
    loaded table is cleared, and the three are resumed in the switch's order.  Returns what was done."""
    active, hidden, origin = stack.dm("active"), stack.dm("hidden"), stack.dm("origin")
    infos = {n: stack.ctl.info(n) for n in (active, hidden, origin)}
    if not any(i.suspended or i.inactive_table for i in infos.values()):
        return []
    if st.role != Role.SECONDARY.value:
        raise DmreplError(f"a switch of {stack.cfg.name}'s {st.role} stack was interrupted (devices left "
                          "suspended)", f"`dmrepl secondary down {stack.cfg.name} --force`, then `up` again")
    b = stack.backing()
    want = _devno(b.stores[st.current_store])
    # The state's size (a resize's switch commits it as a checkpoint's its store); an older state
    # without one: the origin's live length, which only a resize changes.
    sectors = st.size_bytes // 512 if st.size_bytes else stack.ctl.table(origin)[0].length
    done = []

    def right(specs) -> bool:
        return bool(specs) and specs[0].length == sectors

    if _cow(stack.ctl.table(hidden)) != want or not right(stack.ctl.table(hidden)):
        pending = stack.ctl.table(hidden, inactive=True) if infos[hidden].inactive_table else None
        if not (pending and _cow(pending) == want and right(pending)):
            if infos[hidden].inactive_table:
                stack.ctl.clear(hidden)
            stack.ctl.load(hidden, stack.hidden_table(b, st.current_store))
        done.append(f"{hidden}: store {st.current_store} of checkpoint {st.checkpoint}, {sectors} sectors, goes live "
                    "(committed)")
    elif infos[hidden].inactive_table:
        stack.ctl.clear(hidden)
        done.append(f"{hidden}: the next table cleared (the switch was not committed)")
    for name, table in ((origin, [SnapshotOrigin(0, sectors, b.disk)]), (active, stack.over("hidden", b))):
        # A resize's switch loads these too: the length the state says goes live.
        if right(stack.ctl.table(name)):
            if stack.ctl.info(name).inactive_table:
                stack.ctl.clear(name)
                done.append(f"{name}: the next table cleared (the switch was not committed)")
        elif not (infos[name].inactive_table and right(stack.ctl.table(name, inactive=True))):
            if stack.ctl.info(name).inactive_table:
                stack.ctl.clear(name)
            stack.ctl.load(name, table)
            done.append(f"{name}: {sectors} sectors (committed)")
    for name in (hidden, origin, active):       # the switch's resume order
        info = stack.ctl.info(name)
        if info.suspended or info.inactive_table:
            stack.ctl.resume(name)
            done.append(f"{name} resumed")
    return done


def _devno(path: str) -> str:
    rdev = os.stat(path).st_rdev
    return f"{os.major(rdev)}:{os.minor(rdev)}"


def _cow(specs) -> str:
    """The COW device of a snapshot table, as the kernel prints it (major:minor)."""
    return specs[0].text.split()[1]
