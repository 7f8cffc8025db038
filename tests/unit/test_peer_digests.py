"""Digests over the control link while the secondary is busy or gone (unit tier, loopback TCP).

The secondary hashes S on a thread of its own and answers heartbeats meanwhile, so the primary
can tell a busy secondary from a lost one in its heartbeat timeout (docs/campaign.md: a link
that went down during a resync's comparison stalled the primary's writes 2-3.5 s).
"""

import hashlib
import threading
import time

import pytest

from dmrepl.daemon import peer
from dmrepl.link.frames import Kind
from dmrepl.link.session import Listener, Session
from dmrepl.roles import digests
from dmrepl.roles.hello import Hello

KEY = bytes(range(32))
P = Hello("vm1", "primary", 64 << 20, 8, 2048, [3], heartbeat_timeout_s=5.0)
S = Hello("vm1", "secondary", 64 << 20, 8, 2048, [3])
PIECE = 4096


def fake_digest(offset: int, length: int) -> bytes:
    return b"".join(hashlib.blake2b(b"%d" % o, digest_size=digests.DIGEST_BYTES).digest()
                    for o in range(offset, offset + length, PIECE))


class Secondary:
    """peer.serve() on a thread, with a hash function that takes `hash_s` seconds."""

    def __init__(self, hash_s: float):
        self.listener = Listener("127.0.0.1", 0, KEY)
        self.hash_s = hash_s
        self.ended: list[str] = []
        threading.Thread(target=self._run, daemon=True).start()

    def _hash(self, spans, piece):
        time.sleep(self.hash_s)
        return b"".join(fake_digest(o, n) for o, n in spans)

    def _run(self):
        session = self.listener.accept(timeout=10)
        self.ended.append(peer.serve(session, S, lambda n: 0.0, hash_s=self._hash))


def connect(port: int) -> Session:
    session = Session.connect("127.0.0.1", port, KEY)
    peer.exchange_hello(session, P)
    return session


def keepalive(session: Session, stop: threading.Event, interval: float = 0.1) -> None:
    """The primary's keepalive thread (primary_link.SecondaryLink._keepalive)."""
    while not stop.is_set():
        try:
            session.send(Kind.HEARTBEAT, {"t": time.time()})
        except OSError:
            return
        stop.wait(interval)


def test_a_secondary_that_hashes_longer_than_the_heartbeat_timeout_is_not_lost():
    sec = Secondary(hash_s=1.5)
    stop = threading.Event()
    with connect(sec.listener.port) as session:
        threading.Thread(target=keepalive, args=(session, stop), daemon=True).start()
        try:
            wait = peer.remote_digests(session, [(0, 8 * PIECE), (1 << 20, 2 * PIECE)], PIECE, silence=0.4)
            got = wait()
        finally:
            stop.set()
    assert got == fake_digest(0, 8 * PIECE) + fake_digest(1 << 20, 2 * PIECE)
    sec.listener.close()


def test_a_silent_secondary_is_lost_in_the_heartbeat_timeout_not_the_answer_timeout():
    sec = Secondary(hash_s=1.5)
    with connect(sec.listener.port) as session:
        # No keepalive: the secondary has no heartbeat to answer while it hashes, as when the
        # link is down (nothing reaches it and nothing comes back).
        wait = peer.remote_digests(session, [(0, 8 * PIECE)], PIECE, silence=0.4, timeout=30)
        t0 = time.monotonic()
        with pytest.raises(peer.PeerSilent, match="sent nothing for 0.4 s"):
            wait()
        assert time.monotonic() - t0 < 1.0
    sec.listener.close()


def test_heartbeats_are_answered_while_a_digest_request_is_hashed():
    sec = Secondary(hash_s=1.0)
    with connect(sec.listener.port) as session:
        session.send(Kind.DIGESTS, {"offset": 0, "spans": [[0, PIECE]], "piece": PIECE})
        session.send(Kind.HEARTBEAT, {"t": 1})
        first = session.recv(timeout=0.5)           # before the hash is done
        assert first[0] == Kind.HEARTBEAT
        kind, body = session.recv(timeout=5)
        assert kind == Kind.DIGESTS_REPLY and digests.decode(body["digests"], 1) == fake_digest(0, PIECE)
    sec.listener.close()
