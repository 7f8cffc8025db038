"""The two daemons' conversation over the control link: hello, then checkpoints, heartbeats, status.

    primary                                secondary
    HELLO {its Hello}              ->
                                   <-      HELLO_OK {its Hello}  |  REFUSED {reasons}
    CHECKPOINT {n}                 ->      (switches its hidden store, persists n)
                                   <-      CHECKPOINT_DONE {n, ok, pause_ms | error}
    HEARTBEAT {t}                  ->
                                   <-      HEARTBEAT {t}
    DIGESTS {offset, spans, piece} ->     (hashes those pieces of S)
                                   <-      DIGESTS_REPLY {offset, digests | error}
    SWITCHOVER {n}                 ->      (n the last checkpoint: can it take over there?)
                                   <-      SWITCHOVER_READY {n, ok | error}
    (the primary removes its stack and disconnects NBD)
    SWITCHOVER_GO {n}              ->      (fails over at n, its store empty: nothing rolled back)
                                   <-      SWITCHOVER_DONE {n, ok | error}; the session ends
    GROW {size_bytes}              ->      (its stack at the new size, the new range diverged)
                                   <-      GROW_DONE {size_bytes, ok | error}

The secondary ends the session (and reports the primary lost) when no frame
came for the primary's heartbeat timeout, which the primary's hello gives.

A checkpoint is two-sided: the primary's top device stays suspended (every
acknowledged write on P and S) while the secondary switches; the primary
records n only once the secondary said done.  If the secondary fails, it has
rolled back to n-1 and the primary does not record n: both stay at n-1.  If
the primary cannot record n after the secondary did, its next checkpoint asks
for n again and the secondary takes its view anew at that number.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from typing import Callable

from dmrepl.errors import DmreplError
from dmrepl.link.frames import FrameError, Kind
from dmrepl.link.session import Session
from dmrepl.roles import digests
from dmrepl.roles.hello import Hello, agree

log = logging.getLogger(__name__)

CHECKPOINT_TIMEOUT = 30.0


class PeerRefused(DmreplError):
    """The peer refused this host at hello (or this host refused the peer), or a request of a
    switchover; `unchanged`: the peer says it changed nothing."""

    unchanged = True


class NotTakenOver(DmreplError):
    """The secondary's half of a switchover failed before it changed anything."""


class PeerCheckpointFailed(DmreplError):
    pass


class ExportRestarted(FrameError):
    """The secondary restarted nbdkit while the primary waited for an answer: the NBD connections
    are gone, whatever the answer would have been."""


def _skip_or_raise(kind: Kind, body: dict) -> None:
    """Frames that are no answer: heartbeats and early-checkpoint requests are skipped; a restarted
    export ends the wait (the primary must drop the leg now, not after its own exchange)."""
    if kind == Kind.EXPORT_RESTARTED:
        raise ExportRestarted(f"the secondary's nbdkit died ({body.get('reason')}): its NBD connections are gone")


def exchange_hello(session: Session, mine: Hello, timeout: float = 10.0) -> Hello:
    """The primary's side: send our Hello, check the answer; raises PeerRefused with every reason."""
    session.send(Kind.HELLO, mine.to_wire())
    kind, body = session.recv(timeout=timeout)
    if kind == Kind.REFUSED:
        session.close()
        reasons = body.get("reasons", [])
        with contextlib.suppress(ValueError, TypeError):
            reasons = agree(mine, Hello.from_wire(body["hello"])).reasons  # phrased from this host's side
        raise PeerRefused(f"the peer at {session.peer} refused this host: " + "; ".join(map(str, reasons)),
                          "make the two configs agree")
    if kind != Kind.HELLO_OK:
        session.close()
        raise FrameError(f"expected HELLO_OK or REFUSED, received {kind.name}")
    theirs = Hello.from_wire(body)
    agreement = agree(mine, theirs)
    if not agreement.ok:
        session.close()
        raise PeerRefused(f"the peer at {session.peer} does not match this host: " + "; ".join(agreement.reasons),
                          "make the two configs agree")
    return theirs


class PeerSilent(TimeoutError):
    """The secondary sent no frame at all, not even a heartbeat's answer, for the heartbeat timeout."""


def _answer(session: Session, want: Kind, matches: Callable[[dict], bool], timeout: float, what: str,
            silence: float | None = None) -> dict:
    """The body of the next frame of kind `want` that `matches`, within `timeout`: heartbeats and
    early-checkpoint requests in between are no answer and are skipped; anything else is a
    FrameError.  `silence`: the longest gap between two frames of any kind (a secondary that
    answers heartbeats while it works is alive; one that answers nothing is lost)."""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        wait = min(left, silence) if silence else left
        if left <= 0:
            session.close()
            raise TimeoutError(f"no {what} within {timeout:g} s")
        try:
            kind, body = session.recv(timeout=wait)
        except TimeoutError:
            if wait < left:
                raise PeerSilent(f"the secondary sent nothing for {wait:.1f} s, not even a heartbeat's "
                                 f"answer, while this host waited for {what}") from None
            raise TimeoutError(f"no {what} within {timeout:g} s") from None
        if kind == want and matches(body):
            return body
        _skip_or_raise(kind, body)
        if kind not in (Kind.HEARTBEAT, Kind.EARLY_CHECKPOINT):
            raise FrameError(f"expected {what}, received {kind.name}")


def remote_checkpoint(session: Session, n: int, timeout: float = CHECKPOINT_TIMEOUT) -> float:
    """Ask the secondary for checkpoint n; returns its pause in seconds, raises if it failed."""
    session.send(Kind.CHECKPOINT, {"n": n})
    body = _answer(session, Kind.CHECKPOINT_DONE, lambda b: b.get("n") == n, timeout, f"CHECKPOINT_DONE for {n}")
    if not body.get("ok"):
        raise PeerCheckpointFailed(f"the secondary could not take checkpoint {n}: {body.get('error')}",
                                   "both hosts stay at the previous checkpoint; see the secondary's log")
    return float(body.get("pause_ms", 0)) / 1000


def remote_digests(session: Session, spans: list[tuple[int, int]], piece: int, silence: float,
                   timeout: float = CHECKPOINT_TIMEOUT) -> Callable[[], bytes]:
    """Ask the secondary for its digests of S's pieces in the (offset, length) spans; the returned
    call waits for them.  In between, this host hashes its own pieces: both hosts work at once.
    The secondary hashes on a thread of its own and answers heartbeats meanwhile: after `silence`
    seconds without any frame it is lost (PeerSilent), however long its hashing may take."""
    offset = spans[0][0]
    session.send(Kind.DIGESTS, {"offset": offset, "spans": [list(s) for s in spans], "piece": piece})
    return lambda: _digests_reply(session, offset, sum(n for _o, n in spans), piece, timeout, silence)


def _digests_reply(session: Session, offset: int, length: int, piece: int, timeout: float,
                   silence: float) -> bytes:
    body = _answer(session, Kind.DIGESTS_REPLY, lambda b: b.get("offset") == offset, timeout,
                   f"DIGESTS_REPLY for {offset}", silence)
    if "error" in body:
        raise DmreplError(f"the secondary cannot hash S at {offset}: {body['error']}")
    try:
        return digests.decode(str(body.get("digests", "")), length // piece)
    except ValueError as e:
        raise FrameError(f"DIGESTS_REPLY: {e}") from None


SWITCHOVER_TIMEOUT = 120.0     # the secondary's failover of an empty store: a switch and a merge of nothing


def _ask(session: Session, ask: Kind, answer: Kind, n: int, timeout: float, silence: float | None) -> dict:
    session.send(ask, {"n": n})
    body = _answer(session, answer, lambda b: b.get("n") == n, timeout, f"{answer.name} for {n}", silence)
    if not body.get("ok"):
        e = PeerRefused(f"the secondary at {session.peer}: {body.get('error')}",
                        body.get("hint") or "see the secondary's log")
        e.unchanged = answer == Kind.SWITCHOVER_READY or bool(body.get("unchanged"))
        raise e
    return body


def remote_grow(session: Session, size_bytes: int, silence: float | None = None,
                timeout: float = CHECKPOINT_TIMEOUT) -> dict:
    """Ask the secondary to grow its stack to `size_bytes`; PeerRefused says why it did not (then
    it changed nothing)."""
    session.send(Kind.GROW, {"size_bytes": size_bytes})
    body = _answer(session, Kind.GROW_DONE, lambda b: b.get("size_bytes") == size_bytes, timeout,
                   f"GROW_DONE for {size_bytes} bytes", silence)
    if not body.get("ok"):
        raise PeerRefused(f"the secondary at {session.peer}: {body.get('error')}",
                          body.get("hint") or "see the secondary's log")
    return body


def switchover_ready(session: Session, n: int, silence: float | None = None,
                     timeout: float = CHECKPOINT_TIMEOUT) -> dict:
    """Ask the secondary whether it can take over at checkpoint n; PeerRefused says why not."""
    return _ask(session, Kind.SWITCHOVER, Kind.SWITCHOVER_READY, n, timeout, silence)


def switchover_go(session: Session, n: int, silence: float | None = None,
                  timeout: float = SWITCHOVER_TIMEOUT) -> dict:
    """Tell the secondary to take over at n (this host's stack is gone); its answer once it has.
    PeerRefused: it did not, and says whether it changed nothing (`unchanged`)."""
    return _ask(session, Kind.SWITCHOVER_GO, Kind.SWITCHOVER_DONE, n, timeout, silence)


class _Hasher:
    """The secondary's digests, on a thread of its own, one request after the other: the session's
    loop answers heartbeats meanwhile (a link that goes down during a resync's comparison is then
    noticed in the heartbeat timeout, not after the primary's whole wait for an answer)."""

    def __init__(self, session: Session, hash_s: Callable[[list[tuple[int, int]], int], bytes] | None):
        self.session, self.hash_s = session, hash_s
        self.requests: queue.SimpleQueue = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._run, name="digests", daemon=True)
        self.thread.start()

    def submit(self, body: dict) -> None:
        self.requests.put(body)

    def close(self) -> None:
        """No more requests; one being hashed finishes on its own (its reply fails on the closed session)."""
        self.requests.put(None)

    def _run(self) -> None:
        while (body := self.requests.get()) is not None:
            try:
                _answer_digests(self.session, body, self.hash_s)
            except (OSError, FrameError):
                return      # the session broke: its loop sees it too


def _answer_digests(session: Session, body: dict,
                    hash_s: Callable[[list[tuple[int, int]], int], bytes] | None) -> None:
    offset = body.get("offset")
    try:
        if hash_s is None:
            raise ValueError("this host does not serve digests")
        d = hash_s(digests.spans_from_wire(body.get("spans")), int(body.get("piece")))
        session.send(Kind.DIGESTS_REPLY, {"offset": offset, "digests": digests.encode(d)})
    except (ValueError, TypeError, OSError) as e:
        session.send(Kind.DIGESTS_REPLY, {"offset": offset, "error": str(e)})


class Switchover:
    """The secondary's half of a planned switchover: `ready(n)` checks that it can take over at
    checkpoint n and raises DmreplError if not (nothing changed); `go(n)` takes over and returns
    what to tell the primary, or raises NotTakenOver if it changed nothing (any other error: it
    may have)."""

    def ready(self, n: int) -> None:
        raise DmreplError("this host cannot take over by switchover")

    def go(self, n: int) -> dict:
        raise DmreplError("this host cannot take over by switchover")


SWITCHED_OVER = "switched over: this host took over as primary"


def serve(session: Session, mine: Hello | Callable[[Hello], Hello], take_checkpoint: Callable[[int], float],
          status: Callable[[], dict] = dict, hash_s: Callable[[list[tuple[int, int]], int], bytes] | None = None,
          on_hello: Callable[[Hello], str | None] | None = None, switchover: Switchover | None = None,
          grow: Callable[[int], dict] | None = None) -> str:
    """The secondary's side of one authenticated session, until the peer goes or breaks the protocol.

    `mine` may be a function of the primary's Hello: the secondary echoes what only the primary
    decides (the era block size).  `on_hello(theirs)`, once the hellos agree and before the answer
    goes, returns the session's export name (its NBD gate admits the primary from then on).
    `switchover`: this host's half of a planned switchover (none: refused); `grow(size_bytes)`:
    this host's stack at a new size (none: refused).  Returns why the
    session ended (SWITCHED_OVER once this host took over)."""
    kind, body = session.recv(timeout=10.0)
    if kind != Kind.HELLO:
        log.warning("peer %s: expected HELLO, received %s: closing", session.peer, kind.name)
        session.close()
        return
    try:
        theirs = Hello.from_wire(body)
    except ValueError as e:
        log.warning("peer %s: %s: closing", session.peer, e)
        session.close()
        return
    if callable(mine):
        mine = mine(theirs)
    agreement = agree(mine, theirs)
    if not agreement.ok:
        log.warning("peer %s refused at hello: %s", session.peer, "; ".join(agreement.reasons))
        session.send(Kind.REFUSED, {"reasons": agreement.reasons, "hello": mine.to_wire()})
        session.close()
        return
    name = on_hello(theirs) if on_hello is not None else None
    session.send(Kind.HELLO_OK, {**mine.to_wire(), "export_name": name})
    log.info("peer %s: hello ok (common checkpoint %s)", session.peer, agreement.common_checkpoint)
    hasher = _Hasher(session, hash_s)
    try:
        return _serve_loop(session, theirs.heartbeat_timeout_s or None, take_checkpoint, status, hasher,
                           switchover or Switchover(), grow)
    finally:
        hasher.close()


def _serve_loop(session: Session, silence: float | None, take_checkpoint: Callable[[int], float],
                status: Callable[[], dict], hasher: _Hasher, switchover: Switchover,
                grow: Callable[[int], dict] | None = None) -> str:
    agreed = None           # the checkpoint of a switchover this host said it is ready for
    while True:
        try:
            kind, body = session.recv(timeout=silence)
        except TimeoutError:
            return f"no frame from the primary for {silence:g} s (its heartbeat timeout)"
        except (FrameError, OSError) as e:
            return f"the control link ended: {e}"
        if kind == Kind.CHECKPOINT:
            n = body.get("n")
            if not isinstance(n, int):
                session.send(Kind.CHECKPOINT_DONE, {"n": n, "ok": False, "error": "no checkpoint number"})
                continue
            try:
                pause = take_checkpoint(n)
            except Exception as e:  # noqa: BLE001 -- the primary must hear why, whatever it was
                log.error("checkpoint %d failed: %s", n, e)
                session.send(Kind.CHECKPOINT_DONE, {"n": n, "ok": False, "error": str(e)})
                continue
            session.send(Kind.CHECKPOINT_DONE, {"n": n, "ok": True, "pause_ms": round(pause * 1000, 3)})
        elif kind == Kind.HEARTBEAT:
            session.send(Kind.HEARTBEAT, {"t": time.time()})
        elif kind == Kind.STATUS:
            session.send(Kind.STATUS_REPLY, status())
        elif kind == Kind.DIGESTS:
            hasher.submit(body)
        elif kind == Kind.GROW:
            size = body.get("size_bytes")
            try:
                if not isinstance(size, int) or size <= 0:
                    raise DmreplError("no size")
                if grow is None:
                    raise DmreplError("this host does not grow on the primary's word")
                done = grow(size)
            except Exception as e:  # noqa: BLE001 -- the primary must hear why, whatever it was
                log.error("grow to %s bytes refused: %s", size, e)
                session.send(Kind.GROW_DONE, {"size_bytes": size, "ok": False, "error": str(e),
                                              "hint": getattr(e, "hint", None)})
                continue
            session.send(Kind.GROW_DONE, {"size_bytes": size, "ok": True, **done})
        elif kind in (Kind.SWITCHOVER, Kind.SWITCHOVER_GO):
            n = body.get("n")
            answer = Kind.SWITCHOVER_READY if kind == Kind.SWITCHOVER else Kind.SWITCHOVER_DONE
            try:
                if not isinstance(n, int):
                    raise DmreplError("no checkpoint number")
                if kind == Kind.SWITCHOVER:
                    switchover.ready(n)
                    agreed = n
                    session.send(answer, {"n": n, "ok": True})
                    continue
                if agreed != n:
                    raise DmreplError(f"no switchover at checkpoint {n} was agreed in this session")
                done = switchover.go(n)
            except Exception as e:  # noqa: BLE001 -- the primary must hear why, whatever it was
                log.error("switchover at checkpoint %s refused: %s", n, e)
                session.send(answer, {"n": n, "ok": False, "error": str(e), "hint": getattr(e, "hint", None),
                                      "unchanged": kind == Kind.SWITCHOVER or isinstance(e, NotTakenOver)})
                continue
            try:
                session.send(answer, {"n": n, "ok": True, **done})
            except OSError as e:        # taken over all the same: the primary finds it at its next hello
                log.error("switchover at checkpoint %s: taken over, but the answer could not be sent: %s", n, e)
            return SWITCHED_OVER
        else:
            log.warning("peer %s: unexpected %s: ignored", session.peer, kind.name)
