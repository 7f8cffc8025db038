"""Roles of a resource on this host and the operations allowed in each: data, not scattered checks.

libnbd's generator is the model: every state with a one-line comment, every
operation with the states it is allowed in and the state it leads to, one
guard that says "invalid state".  Every operation of a role asks `check`
before it touches anything.
"""

from __future__ import annotations

from enum import Enum

from dmrepl.errors import DmreplError


class Role(str, Enum):
    SECONDARY = "secondary"   # standby: the hidden store keeps the last checkpoint
    MERGING = "merging"       # failed over: the hidden store merges back into the disk, I/O goes on
    PRIMARY = "primary"       # took over: the disk is the data, no hidden store

    def __str__(self) -> str:
        return self.value


class Op(str, Enum):
    CHECKPOINT = "checkpoint"     # switch the hidden store: the standby view becomes the disk
    FAILOVER = "failover"         # fence the primary, merge the hidden store under the active device
    FINISH_MERGE = "finish-merge"  # the merge is complete: the origin becomes linear over the disk
    WATCH_STORE = "watch-store"   # record what the hidden store's fill level asks for

    def __str__(self) -> str:
        return self.value


# (role, operation) -> the role afterwards.  A pair that is absent is refused.
TRANSITIONS: dict[tuple[Role, Op], Role] = {
    (Role.SECONDARY, Op.CHECKPOINT): Role.SECONDARY,
    (Role.SECONDARY, Op.FAILOVER): Role.MERGING,
    (Role.SECONDARY, Op.WATCH_STORE): Role.SECONDARY,
    (Role.MERGING, Op.FAILOVER): Role.MERGING,          # asked again: the merge goes on
    (Role.MERGING, Op.FINISH_MERGE): Role.PRIMARY,
    (Role.PRIMARY, Op.FINISH_MERGE): Role.PRIMARY,      # already finished: nothing to do
}

# What to tell the user when an operation is refused, by operation.
REFUSALS: dict[Op, tuple[str, str]] = {
    Op.CHECKPOINT: ("checkpoints are taken only on a secondary",
                    "a failover is in progress or done on this host"),
    Op.FAILOVER: ("nothing to fail over", "this host has already taken over"),
    Op.FINISH_MERGE: ("no merge to finish", "a merge follows a failover"),
    Op.WATCH_STORE: ("no hidden store to watch", "only a secondary has one"),
}


class InvalidTransition(DmreplError):
    """An operation asked in a role that does not allow it."""

    def __init__(self, resource: str, role: Role, op: Op):
        what, hint = REFUSALS[op]
        allowed = ", ".join(str(r) for r in allowed_in(op))
        super().__init__(f"resource {resource} is {role}: {what} (invalid state for {op}: must be {allowed})",
                         hint)
        self.role, self.op = role, op


def allowed_in(op: Op) -> list[Role]:
    return [role for (role, o) in TRANSITIONS if o == op]


def check(resource: str, role: Role | str, op: Op) -> Role:
    """The role after `op`, or InvalidTransition if `op` is not allowed in `role`."""
    role = Role(role)
    try:
        return TRANSITIONS[(role, op)]
    except KeyError:
        raise InvalidTransition(resource, role, op) from None


def allowed(role: Role | str, op: Op) -> bool:
    return (Role(role), op) in TRANSITIONS


def is_noop(role: Role | str, op: Op) -> bool:
    """An operation asked again once done (a second failover, a merge already finished)."""
    return (Role(role), op) in {(Role.MERGING, Op.FAILOVER), (Role.PRIMARY, Op.FINISH_MERGE)}
