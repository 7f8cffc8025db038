"""`dmrepl resize`'s frame between the daemons (unit tier, loopback TCP): GROW answered with
GROW_DONE, a refusal carried back with its reason, bad input refused."""

import threading

import pytest

from dmrepl.daemon import peer
from dmrepl.errors import DmreplError
from dmrepl.link.frames import Kind
from dmrepl.link.session import Listener, Session
from dmrepl.roles.hello import Hello

pytestmark = pytest.mark.unit

KEY = bytes(range(32))
P = Hello("vm1", "primary", 64 << 20, 8, 2048, [3], heartbeat_timeout_s=5.0)
S = Hello("vm1", "secondary", 64 << 20, 8, 2048, [3])


def serve(grow):
    listener = Listener("127.0.0.1", 0, KEY)
    ended: list[str] = []

    def run():
        session = listener.accept(timeout=10)
        ended.append(peer.serve(session, S, lambda n: 0.0, grow=grow))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    session = Session.connect("127.0.0.1", listener.port, KEY)
    peer.exchange_hello(session, P)
    return listener, session, thread, ended


def test_grow_is_answered_with_what_the_secondary_did():
    asked = []
    listener, session, thread, ended = serve(lambda size: asked.append(size) or {"grown_from": 64 << 20})
    with session:
        done = peer.remote_grow(session, 96 << 20)
        assert peer.remote_checkpoint(session, 4) == 0.0       # the session goes on
    thread.join(timeout=10)
    listener.close()
    assert asked == [96 << 20] and done["grown_from"] == 64 << 20 and done["ok"] is True


def test_a_refused_grow_says_why():
    def refuse(size):
        raise DmreplError("this host's disk is 64 MiB", "grow it first")

    listener, session, thread, ended = serve(refuse)
    with session:
        with pytest.raises(peer.PeerRefused, match="this host's disk is 64 MiB") as e:
            peer.remote_grow(session, 96 << 20)
        assert e.value.hint == "grow it first"
    thread.join(timeout=10)
    listener.close()


@pytest.mark.parametrize("body", [{}, {"size_bytes": "96M"}, {"size_bytes": -1}])
def test_a_grow_without_a_size_is_refused_and_nothing_is_asked(body):
    asked = []
    listener, session, thread, ended = serve(lambda size: asked.append(size) or {})
    with session:
        session.send(Kind.GROW, body)
        kind, reply = session.recv(timeout=5)
    thread.join(timeout=10)
    listener.close()
    assert kind == Kind.GROW_DONE and reply["ok"] is False and reply["error"] == "no size" and asked == []


def test_a_secondary_without_grow_refuses():
    listener, session, thread, ended = serve(None)
    with session:
        with pytest.raises(peer.PeerRefused, match="does not grow"):
            peer.remote_grow(session, 96 << 20)
    thread.join(timeout=10)
    listener.close()
