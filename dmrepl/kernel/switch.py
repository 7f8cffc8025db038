"""One switch of several dm devices' tables, with one rollback.

Every role change of a stack (a checkpoint on either host, a failover, the end
of a merge) is the same sequence:

    suspend devices top-down  ->  load new tables  ->  commit (persist the state)
    ->  resume bottom-up

The state is written *between* the load and the resume so that a power loss
at any point leaves a state that matches what the disks hold (the kernel
forgets the tables, not the stores).  Whatever fails, the rollback leaves
every device it suspended resumed on the table it had before, and calls
`revert` if the commit had happened, so that the caller's state is back at
the previous checkpoint too.

Kernel reference: drivers/md/dm-ioctl.c do_resume -- a resume with an inactive
table swaps it in first; if the swap fails the old table stays live, if a
target's preresume fails afterwards the *new* table is live and the device
stays suspended.  The rollback therefore compares each device's live table
with the one saved before the switch, not with what it meant to do.
"""

from __future__ import annotations

import errno
import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

from dmrepl.kernel.dm import Control, Spec, TargetLine
from dmrepl.kernel.errors import DMError

log = logging.getLogger(__name__)


@dataclass
class SwitchPlan:
    """What one switch does; names are dm device names."""

    suspend: Sequence[str]                      # top-down: users before what they use
    load: dict[str, list[TargetLine]]           # device -> its new table
    resume: Sequence[str]                       # bottom-up: what is used before its users
    commit: Callable[[], None] = lambda: None   # persist the new state (after load, before resume)
    revert: Callable[[], None] = lambda: None   # put the previous state back (rollback after commit)
    flush: bool = True                          # suspend with flush: acknowledged writes reach the disks
    resume_old: Sequence[str] | None = None     # rollback: the order that resumes the old stack
                                                # bottom-up (default: `resume`, then the rest)


@dataclass
class SwitchResult:
    pause_seconds: float                        # first suspend to last resume


@dataclass
class _Progress:
    suspended: list[str] = field(default_factory=list)
    loaded: list[str] = field(default_factory=list)
    committed: bool = False


class SwitchError(DMError):
    """A switch failed and was rolled back; `.cause` is the first failure.

    errno, call and object are the cause's; rollback steps that failed too are
    listed in `.rollback_failures` (the message names them).
    """

    def __init__(self, cause: BaseException, rollback_failures: list[str]):
        err = getattr(cause, "errno", None) or errno.EIO  # the cause may not be an OSError
        call = getattr(cause, "call", type(cause).__name__)
        obj = getattr(cause, "obj", None)
        detail = getattr(cause, "detail", None) if isinstance(cause, DMError) else str(cause)
        extra = "switch rolled back"
        if rollback_failures:
            extra += "; rollback also failed: " + "; ".join(rollback_failures)
        super().__init__(err, call, obj, f"{detail}; {extra}" if detail else extra)
        self.cause = cause
        self.rollback_failures = rollback_failures


def run(ctl: Control, plan: SwitchPlan) -> SwitchResult:
    """Carry out `plan`; on any failure roll back and raise SwitchError."""
    everything = list(dict.fromkeys([*plan.suspend, *plan.load, *plan.resume]))
    saved = {name: ctl.table(name) for name in plan.load}
    progress = _Progress()
    t0 = time.perf_counter()
    try:
        for name in plan.suspend:
            ctl.suspend(name, flush=plan.flush)
            progress.suspended.append(name)
        for name, table in plan.load.items():
            ctl.load(name, table)
            progress.loaded.append(name)
        plan.commit()
        progress.committed = True
        for name in plan.resume:
            ctl.resume(name)
    except BaseException as cause:
        failures = _rollback(ctl, plan, saved, progress, everything)
        raise SwitchError(cause, failures) from cause
    return SwitchResult(pause_seconds=time.perf_counter() - t0)


def _rollback(ctl: Control, plan: SwitchPlan, saved: dict[str, list[Spec]], progress: _Progress,
              everything: list[str]) -> list[str]:
    """Every step is tried whatever the others did; returns the steps that failed."""
    failures: list[str] = []

    def attempt(what: str, step: Callable[[], object]) -> None:
        try:
            step()
        except BaseException as e:  # noqa: BLE001 -- a rollback must go on
            failures.append(f"{what}: {e}")
            log.error("switch rollback: %s failed: %s", what, e)

    if progress.committed:
        attempt("revert the state", plan.revert)
    # Devices whose new table went live (a resume that swapped it in, then failed
    # or was followed by a failure) get their saved table back; they must be
    # suspended for that, top-down as at the start.
    changed = []
    for name in progress.loaded:
        try:
            if ctl.table(name) != saved[name]:
                changed.append(name)
        except DMError as e:
            failures.append(f"read the table of {name}: {e}")
    if changed:
        for name in plan.suspend:
            attempt(f"suspend {name}", lambda n=name: ctl.info(n).suspended or ctl.suspend(n, flush=False))
    for name in progress.loaded:
        attempt(f"clear the inactive table of {name}",
                lambda n=name: ctl.info(n).inactive_table and ctl.clear(n))
    for name in changed:
        attempt(f"reload the previous table of {name}", lambda n=name: ctl.load(n, saved[n]))
    # Resume bottom-up: the plan's resume order, then anything else still suspended.
    touched = set(progress.suspended) | set(changed)
    first = list(plan.resume_old if plan.resume_old is not None else plan.resume)
    order = [*first, *[n for n in reversed(everything) if n not in first]]
    for name in (n for n in order if n in touched):
        attempt(f"resume {name}", lambda n=name: ctl.info(n).suspended and ctl.resume(n))
    return failures
