"""The primary daemon's states and the events that move it: data, not scattered flags.

Like roles/transitions.py (libnbd's generator is the model): every state with
a one-line comment, every event with the states it may arrive in and the state
it leads to.  An event absent from the table in the current state is a bug in
the daemon, reported as "invalid state", never silently ignored.  `status`
shows the state, since when, and the reason of the last move.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum

from dmrepl.errors import DmreplError


class State(str, Enum):
    CONNECTING = "connecting"       # control link, hello, NBD attach to the secondary
    SYNCING = "syncing"             # the initial full copy of P to S, then its verification
    REPLICATING = "replicating"     # every write on P and S; checkpoints run
    DEGRADED = "degraded"           # the secondary is lost: its NBD leg dropped, writes reach P only
                                    # (era records them); reconnects every reconnect_interval_s
    RESYNCING = "resyncing"         # back: every write on both legs, the pieces that differ being copied;
                                    # S's view stays at the last checkpoint until the copy is done
    STOPPING = "stopping"           # tearing down on request
    FAILED = "failed"               # could not start: the reason says why; nothing is left running

    def __str__(self) -> str:
        return self.value


class Event(str, Enum):
    CONNECTED = "connected"               # hello agreed, NBD attached; S needs the initial sync
    CONNECTED_IN_SYNC = "connected-in-sync"  # S known equal to P; stack up, first checkpoint taken
    SYNCED = "synced"                     # initial copy verified; stack up, first checkpoint taken
    RECONNECTED = "reconnected"           # hello agreed with a secondary that holds older data: resync
    RESYNCED = "resynced"                 # every differing piece copied; a checkpoint joined the hosts
    START_DEGRADED = "start-degraded"     # a restart without the secondary: the stack is up without it
    RESYNC_FAILED = "resync-failed"       # the comparison or the copy failed: the leg is dropped again
    REPAIR = "repair"                     # verify --repair found differing pieces: they are resynced
    CHECKPOINT_FAILED = "checkpoint-failed"  # both hosts stay at n-1; replication goes on
    LINK_DEAD = "link-dead"               # the kernel NBD client announced NBD_CMD_LINK_DEAD
    LEG_FAILED = "leg-failed"             # the mirror marked the NBD leg failed
    HEARTBEAT_MISSED = "heartbeat-missed"  # the secondary did not answer heartbeats in time
    LINK_ERROR = "link-error"             # the control link broke (closed, bad frame)
    STOP = "stop"                         # SIGTERM or `dmrepl down`
    SWITCHOVER = "switchover"             # `dmrepl switchover`: the stack is gone, the secondary takes over
    RESIZE = "resize"                     # `dmrepl resize`: the leg dropped while this host grows; a resync follows
    START_FAILED = "start-failed"         # an error before replication started

    def __str__(self) -> str:
        return self.value


_LOST = (Event.LINK_DEAD, Event.LEG_FAILED, Event.HEARTBEAT_MISSED, Event.LINK_ERROR)

TRANSITIONS: dict[tuple[State, Event], State] = {
    (State.CONNECTING, Event.CONNECTED): State.SYNCING,
    (State.CONNECTING, Event.CONNECTED_IN_SYNC): State.REPLICATING,
    (State.CONNECTING, Event.RECONNECTED): State.RESYNCING,
    (State.CONNECTING, Event.START_DEGRADED): State.DEGRADED,
    (State.DEGRADED, Event.RECONNECTED): State.RESYNCING,
    (State.RESYNCING, Event.RESYNCED): State.REPLICATING,
    (State.RESYNCING, Event.STOP): State.STOPPING,
    (State.RESYNCING, Event.RESYNC_FAILED): State.DEGRADED,
    (State.REPLICATING, Event.REPAIR): State.RESYNCING,
    (State.CONNECTING, Event.START_FAILED): State.FAILED,
    (State.CONNECTING, Event.STOP): State.STOPPING,
    (State.SYNCING, Event.SYNCED): State.REPLICATING,
    (State.SYNCING, Event.START_FAILED): State.FAILED,
    (State.SYNCING, Event.STOP): State.STOPPING,
    (State.REPLICATING, Event.CHECKPOINT_FAILED): State.REPLICATING,
    (State.REPLICATING, Event.STOP): State.STOPPING,
    (State.REPLICATING, Event.SWITCHOVER): State.STOPPING,
    (State.REPLICATING, Event.RESIZE): State.DEGRADED,
    (State.DEGRADED, Event.STOP): State.STOPPING,
    **{(State.REPLICATING, e): State.DEGRADED for e in _LOST},
    **{(State.RESYNCING, e): State.DEGRADED for e in _LOST},
    # A second sign of the same loss (LINK_DEAD after a missed heartbeat): the state stays, the reason too.
    **{(State.DEGRADED, e): State.DEGRADED for e in _LOST},
}

# What a request from the CLI needs, by request.
REQUIRES: dict[str, tuple[State, ...]] = {
    "checkpoint": (State.REPLICATING,),
    "verify": (State.REPLICATING,),
    "switchover": (State.REPLICATING,),
    "resize": (State.REPLICATING,),
    "status": tuple(State),
    "stop": tuple(State),
}


class InvalidEvent(DmreplError):
    pass


def next_state(state: State, event: Event) -> State:
    try:
        return TRANSITIONS[(state, event)]
    except KeyError:
        allowed = ", ".join(sorted({str(s) for (s, e) in TRANSITIONS if e == event}))
        raise InvalidEvent(f"invalid state for event {event}: the daemon is {state}, must be {allowed}") from None


def allows(state: State, request: str) -> bool:
    return state in REQUIRES.get(request, ())


@dataclass
class Machine:
    """The current state, with the reason and time of the last move (for `status` and the log)."""

    state: State = State.CONNECTING
    reason: str = "starting"
    since: float = field(default_factory=time.time)
    history: list[tuple[float, str, str, str]] = field(default_factory=list)  # (time, event, state, reason)
    # Called after every move with (machine, previous state, event): systemd's STATUS=, the event log.
    on_move: Callable[["Machine", State, Event], None] | None = field(default=None, repr=False, compare=False)

    def fire(self, event: Event, reason: str) -> bool:
        """Move on `event`; returns whether the state changed (a repeated loss keeps its first reason)."""
        new = next_state(self.state, event)
        if new == self.state and event in _LOST:
            return False
        changed, previous = new != self.state, self.state
        self.state, self.reason, self.since = new, reason, time.time()
        self.history = (self.history + [(self.since, str(event), str(new), reason)])[-20:]
        if self.on_move is not None:
            self.on_move(self, previous, event)
        return changed

    def refuse_unless(self, request: str, resource: str) -> None:
        if not allows(self.state, request):
            need = ", ".join(str(s) for s in REQUIRES[request])
            raise InvalidEvent(f"resource {resource} is {self.state} ({self.reason}): cannot {request} "
                               f"(invalid state: must be {need})",
                               "see `dmrepl status " + resource + "`")
