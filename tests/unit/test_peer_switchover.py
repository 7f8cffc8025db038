"""A planned switchover's frames between the two daemons (unit tier, loopback TCP): what the
secondary answers to SWITCHOVER and SWITCHOVER_GO, and what the primary learns from it.
The kernel side (both hosts' stacks, the bytes) is tests/kernel/test_switchover.py."""

import threading

import pytest

from dmrepl.daemon import peer
from dmrepl.errors import DmreplError
from dmrepl.link.session import Listener, Session
from dmrepl.roles.hello import Hello

pytestmark = pytest.mark.unit

KEY = bytes(range(32))
P = Hello("vm1", "primary", 64 << 20, 8, 2048, [3], heartbeat_timeout_s=5.0)
S = Hello("vm1", "secondary", 64 << 20, 8, 2048, [3])


class Half(peer.Switchover):
    """The secondary's half, scripted: `refuse_ready`, `refuse_go` (an exception to raise)."""

    def __init__(self, refuse_ready=None, refuse_go=None):
        self.refuse_ready, self.refuse_go = refuse_ready, refuse_go
        self.calls: list[tuple[str, int]] = []

    def ready(self, n):
        self.calls.append(("ready", n))
        if self.refuse_ready:
            raise self.refuse_ready

    def go(self, n):
        self.calls.append(("go", n))
        if self.refuse_go:
            raise self.refuse_go
        return {"rolled_back_bytes": 0, "role": "primary"}


class Secondary:
    def __init__(self, half: Half):
        self.listener = Listener("127.0.0.1", 0, KEY)
        self.half = half
        self.checkpoints: list[int] = []
        self.ended: list[str] = []
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        session = self.listener.accept(timeout=10)
        self.ended.append(peer.serve(session, S, lambda n: self.checkpoints.append(n) or 0.0, switchover=self.half))

    def connect(self) -> Session:
        session = Session.connect("127.0.0.1", self.listener.port, KEY)
        peer.exchange_hello(session, P)
        return session

    def close(self):
        self.listener.close()


def test_ready_then_go_takes_over_and_ends_the_session():
    half = Half()
    sec = Secondary(half)
    with sec.connect() as session:
        assert peer.switchover_ready(session, 4)["ok"] is True
        done = peer.switchover_go(session, 4)
    sec.thread.join(timeout=10)
    assert done["rolled_back_bytes"] == 0 and done["role"] == "primary"
    assert half.calls == [("ready", 4), ("go", 4)]
    assert sec.ended == [peer.SWITCHED_OVER]
    sec.close()


def test_a_refused_ready_says_why_changes_nothing_and_the_session_goes_on():
    half = Half(refuse_ready=DmreplError("its standby consumer holds the active device", "stop it first"))
    sec = Secondary(half)
    with sec.connect() as session:
        with pytest.raises(peer.PeerRefused) as e:
            peer.switchover_ready(session, 4)
        assert "standby consumer holds" in str(e.value) and e.value.hint == "stop it first"
        assert e.value.unchanged
        assert peer.remote_checkpoint(session, 5) == 0.0      # still the secondary of this primary
    sec.thread.join(timeout=10)
    assert sec.checkpoints == [5] and sec.ended[0] != peer.SWITCHED_OVER
    sec.close()


def test_go_without_an_agreed_ready_or_for_another_checkpoint_is_refused():
    half = Half()
    sec = Secondary(half)
    with sec.connect() as session:
        with pytest.raises(peer.PeerRefused, match="no switchover at checkpoint 4 was agreed"):
            peer.switchover_go(session, 4)
        peer.switchover_ready(session, 4)
        with pytest.raises(peer.PeerRefused, match="no switchover at checkpoint 5 was agreed"):
            peer.switchover_go(session, 5)
    sec.thread.join(timeout=10)
    assert ("go", 4) not in half.calls and ("go", 5) not in half.calls
    sec.close()


@pytest.mark.parametrize("error, unchanged", [
    (peer.NotTakenOver("its consumer opened the active device meanwhile"), True),
    (DmreplError("the merge did not finish in time"), False),
])
def test_a_failed_go_says_whether_the_secondary_changed_anything(error, unchanged):
    sec = Secondary(Half(refuse_go=error))
    with sec.connect() as session:
        peer.switchover_ready(session, 4)
        with pytest.raises(peer.PeerRefused) as e:
            peer.switchover_go(session, 4)
    sec.thread.join(timeout=10)
    assert e.value.unchanged is unchanged and str(error) in str(e.value)
    assert sec.ended[0] != peer.SWITCHED_OVER
    sec.close()
