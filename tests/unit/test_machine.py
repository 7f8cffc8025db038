"""The primary daemon's state machine as data (unit tier)."""

import pytest

from dmrepl.daemon.machine import TRANSITIONS, Event, InvalidEvent, Machine, State, allows, next_state


def test_start_with_sync_then_replicate_then_lose_the_link():
    m = Machine()
    assert m.fire(Event.CONNECTED, "hello ok") and m.state == State.SYNCING
    assert m.fire(Event.SYNCED, "verified") and m.state == State.REPLICATING
    assert not m.fire(Event.CHECKPOINT_FAILED, "peer refused") and m.state == State.REPLICATING
    assert m.fire(Event.HEARTBEAT_MISSED, "3 heartbeats unanswered") and m.state == State.DEGRADED
    # The kernel's LINK_DEAD that follows keeps the first reason: that is what happened first.
    assert not m.fire(Event.LINK_DEAD, "nbd0 link dead")
    assert (m.state, m.reason) == (State.DEGRADED, "3 heartbeats unanswered")
    assert m.fire(Event.STOP, "SIGTERM") and m.state == State.STOPPING
    assert [h[1] for h in m.history] == ["connected", "synced", "checkpoint-failed", "heartbeat-missed", "stop"]


def test_a_start_in_sync_skips_the_copy():
    m = Machine()
    m.fire(Event.CONNECTED_IN_SYNC, "assume clean")
    assert m.state == State.REPLICATING


@pytest.mark.parametrize("state,event", [
    (State.CONNECTING, Event.SYNCED),
    (State.SYNCING, Event.CHECKPOINT_FAILED),
    (State.DEGRADED, Event.SYNCED),
    (State.STOPPING, Event.LINK_DEAD),
    (State.FAILED, Event.CONNECTED),
])
def test_events_outside_the_table_are_refused(state, event):
    with pytest.raises(InvalidEvent) as e:
        next_state(state, event)
    assert f"invalid state for event {event}: the daemon is {state}" in str(e.value)


def test_checkpoints_only_while_replicating():
    assert [s for s in State if allows(s, "checkpoint")] == [State.REPLICATING]
    m = Machine(state=State.DEGRADED, reason="link dead")
    with pytest.raises(InvalidEvent) as e:
        m.refuse_unless("checkpoint", "vm1")
    assert "resource vm1 is degraded (link dead): cannot checkpoint (invalid state: must be replicating)" \
        in str(e.value)


def test_every_state_but_the_ends_can_stop():
    for s in State:
        assert ((s, Event.STOP) in TRANSITIONS) == (s not in (State.STOPPING, State.FAILED))


def test_degraded_reconnects_resyncs_and_replicates_again():
    m = Machine(state=State.REPLICATING)
    assert m.fire(Event.LINK_ERROR, "control link broke") and m.state == State.DEGRADED
    assert m.fire(Event.RECONNECTED, "resync: written since checkpoint 4") and m.state == State.RESYNCING
    assert not allows(m.state, "checkpoint")     # S's view must stay at the last checkpoint meanwhile
    assert m.fire(Event.LEG_FAILED, "health AD") and m.state == State.DEGRADED
    m.fire(Event.RECONNECTED, "again")
    assert m.fire(Event.RESYNC_FAILED, "3 pieces not copied") and m.state == State.DEGRADED
    m.fire(Event.RECONNECTED, "again")
    assert m.fire(Event.RESYNCED, "done") and m.state == State.REPLICATING


def test_a_restart_without_the_secondary_comes_up_degraded():
    m = Machine()
    assert m.fire(Event.START_DEGRADED, "no route to host") and m.state == State.DEGRADED
    with pytest.raises(InvalidEvent):
        next_state(State.REPLICATING, Event.RESYNCED)
