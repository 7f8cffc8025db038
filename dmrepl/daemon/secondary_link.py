"""The secondary daemon's end of the control link: one primary at a time, served in a thread.

The listener is bound before the daemon reports ready (a port in use is a
start error, not a silent thread death).  A peer that fails the key handshake,
sends garbage or another resource id is logged and dropped; the next one is
accepted.  Checkpoints run through the secondary's own policy (its lock, its
one switch) with a device-mapper handle of this thread's own.

What it knows of the primary -- connected, or lost and why (the link ended,
or no frame for the primary's heartbeat timeout) -- goes to
STATE_DIR/NAME/peer.json, which `dmrepl status NAME` shows; a lost primary is
logged as "PRIMARY LOST".  Failing over stays the admin's (or a cluster
manager's) decision: nothing here acts on the loss.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from typing import Callable

from dmrepl import private
from dmrepl.config import SecondaryConfig
from dmrepl.daemon import peer
from dmrepl.daemon.gate import Admission
from dmrepl.errors import DmreplError
from dmrepl.kernel import blockdev
from dmrepl.link import auth
from dmrepl.link.frames import FrameError, Kind
from dmrepl.link.session import Listener, Session
from dmrepl.roles import digests
from dmrepl.roles.hello import Hello
from dmrepl.roles.secondary import Secondary

log = logging.getLogger(__name__)
PEER_FILE = "peer.json"


def peer_path(cfg: SecondaryConfig) -> str:
    return os.path.join(cfg.resource_state_dir, PEER_FILE)


def read_peer(cfg: SecondaryConfig) -> dict | None:
    """What the link server last recorded of the primary (None: it never ran)."""
    try:
        with open(peer_path(cfg)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _record_peer(cfg: SecondaryConfig, primary: str, peer: str, reason: str) -> None:
    tmp = peer_path(cfg) + ".tmp"
    with private.open_file(tmp, "w") as f:
        json.dump({"primary": primary, "peer": peer, "since": time.time(), "reason": reason}, f)
    os.replace(tmp, peer_path(cfg))


class _TakeOver(peer.Switchover):
    """This host's half of a planned switchover (`dmrepl switchover` on the primary).

    Ready at checkpoint n when: this host can run as primary (both roles' sections), its state is
    the standby of checkpoint n (no resync under way, the store valid), and its standby consumer
    has closed the active device (this host's stack goes down and comes back as the primary's).
    Go: the primary has removed its stack and disconnected NBD by then; any NBD server left is
    killed (the fence), then the failover at n -- of an empty store: the checkpoint that asked
    for the switchover emptied it and no write came after -- and its merge, done at once."""

    def __init__(self, cfg: SecondaryConfig, sec: Secondary, fence: Callable[[str], object]):
        self.cfg, self.sec, self.fence = cfg, sec, fence

    def ready(self, n: int) -> None:
        name = self.cfg.name
        if self.cfg.era_metadata is None:
            raise DmreplError(f"{self.cfg.source} has no [primary] section: this host cannot become the primary",
                              "add [primary] (and start_as) to its config, or fail over with the OCF agent")
        st = self.sec.state()
        if st is None or st.role != "secondary" or st.checkpoint != n:
            raise DmreplError(f"this host is {st.role if st else 'new'} at checkpoint "
                              f"{st.checkpoint if st else '-'}, not the secondary at checkpoint {n}")
        if st.diverged is not None or st.checkpoint_lost:
            raise DmreplError("this host's standby view is not a checkpoint (a resync has not ended, or the kernel "
                              "invalidated the hidden store)", "let the primary resync it first")
        written = self.sec.store_data_bytes()
        if written:
            raise DmreplError(f"{written} bytes were written here after checkpoint {n} (the hidden store holds "
                              "them): taking over now would drop them", "write nothing after the switchover's "
                              "checkpoint: stop the consumers on both hosts, then switch over again")
        openers = self.sec.active_openers()
        if openers:
            raise DmreplError(f"this host's standby consumer holds {self.sec.active_path} ({openers} opener(s))",
                              f"stop it first: this host's stack goes down and comes back as {name}'s primary")

    def go(self, n: int) -> dict:
        try:
            self.ready(n)
            # A failed failover rolls its switch back (roles/secondary/failover.py): nothing changed.
            st = self.sec.failover(fence=lambda: self.fence(f"switchover at checkpoint {n}"))
        except DmreplError as e:
            raise peer.NotTakenOver(str(e), e.hint) from None
        # Failed over: from here this host is the primary whatever follows (the session ends with
        # SWITCHED_OVER); a merge that does not end now is finished by `up`, as after any failover.
        rolled_back = sum(length for _o, length in st.diverged["ranges"])
        note = None
        try:
            st = self.sec.wait_merge(timeout=60)
        except (DmreplError, OSError) as e:
            note = f"the merge goes on: {e}"
        log.info("switchover: took over at checkpoint %d (%d bytes rolled back)%s; the primary's role comes next",
                 n, rolled_back, f"; {note}" if note else "")
        return {"rolled_back_bytes": rolled_back, "role": st.role, "note": note}


class LinkServer:
    def __init__(self, cfg: SecondaryConfig, stopping: Callable[[], bool], admission: Admission | None = None,
                 on_event: Callable[..., None] = lambda event, **fields: None,
                 fence: Callable[[str], object] = lambda why: None):
        """`admission`: the NBD gate's, opened for the primary's address at each agreed hello and
        closed when the session ends.  Connections it admitted stay: they are the primary kernel's,
        and its consumer's writes must not stall because the primary's daemon died or restarts
        (the next daemon takes them over or disconnects them; a failover's fence kills them).
        `on_event(event, **fields)`: called after each checkpoint ("checkpoint") and each change of
        the primary's state ("primary"): systemd's STATUS=, the event log."""
        self.cfg = cfg
        self.on_event = on_event
        self.fence = fence          # kills every NBD server (a switchover's, before it takes over)
        self.switched_over = False  # this host took over by switchover: the daemon stops, `up` starts the primary
        self.stopping = stopping
        self.admission = admission
        self.listener = Listener(cfg.link_host, cfg.link_port, auth.load_key(cfg.key_file))
        self.session: Session | None = None
        self._thread = threading.Thread(target=self._run, name="link", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self.listener.close()
        if self.session is not None:
            self.session.close()
        self._thread.join(timeout=5)
        peer = read_peer(self.cfg)
        if peer is not None and peer["primary"] == "connected":
            _record_peer(self.cfg, "disconnected", peer["peer"], "this daemon stopped")

    def _tell(self, kind: Kind, reason: str) -> bool:
        """Send the connected primary `kind` with a reason; False if none is connected (or the send failed)."""
        session = self.session
        if session is None:
            return False
        try:
            session.send(kind, {"reason": reason})
            return True
        except OSError:
            return False

    def request_early_checkpoint(self, reason: str) -> bool:
        """Ask the connected primary for a checkpoint now."""
        return self._tell(Kind.EARLY_CHECKPOINT, reason)

    def export_restarted(self, why: str) -> bool:
        """Tell the connected primary that its NBD connections died with nbdkit: the kernel client
        does not always notice a closed connection before its timeout (docs/kernel-notes.md)."""
        return self._tell(Kind.EXPORT_RESTARTED, why)

    def _grow(self, sec: Secondary, size_bytes: int) -> dict:
        st = sec.grow(size_bytes)
        log.info("resize: the stack is %d bytes now (the new range is the primary's resync's to compare)", size_bytes)
        self.on_event("resize", size_bytes=size_bytes, grown_from=(st.diverged or {}).get("grown_from"))
        return {"grown_from": (st.diverged or {}).get("grown_from")}

    def _hello(self, sec: Secondary, theirs: Hello) -> Hello:
        st = sec.state()
        if st is not None and (st.diverged or {}).get("grown_from") == theirs.size_bytes:
            # The primary did not grow after this host did (it failed, or lost power, or the link
            # broke): back to its size, which the disks held at the last checkpoint.
            st = sec.shrink_back()
            log.warning("resize: the primary is still %d bytes: this host's stack is back at that size",
                        theirs.size_bytes)
            self.on_event("resize", size_bytes=theirs.size_bytes, reverted=True)
        stores = sec.stack.backing().stores
        # After a takeover (a switchover or failover whose daemon goes on) this host is no secondary.
        role = "secondary" if st is None or st.role == "secondary" else "primary"
        return Hello(resource_id=self.cfg.resource_id, role=role,
                     size_bytes=blockdev.size_bytes(sec.origin_device()), chunk_sectors=self.cfg.chunk_sectors,
                     era_block_sectors=theirs.era_block_sectors, checkpoints=[st.checkpoint] if st else [],
                     store_bytes=min(blockdev.size_bytes(d) for d in stores),
                     diverged=st.diverged["ranges"] if st and st.diverged else None)

    def _checkpoint(self, sec: Secondary, number: int) -> float:
        st, pause = sec.checkpoint(number=number)
        self.on_event("checkpoint", checkpoint=st.checkpoint, store=st.current_store,
                      pause_ms=round(pause * 1000, 3))
        return pause

    def _run(self) -> None:
        with Secondary.open(self.cfg) as sec:
            while not self.stopping():
                try:
                    session = self.listener.accept(timeout=0.5)
                except socket.timeout:
                    continue
                except FrameError as e:
                    log.warning("control link: refused %s", e)
                    continue
                except OSError:
                    return  # the listener was closed: the daemon stops
                log.info("control link: %s authenticated", session.peer)
                self.session = session
                connected = []
                origin = sec.origin_device()

                def on_hello(_theirs, who=str(session.peer)):
                    connected.append(who)
                    address = who.rsplit(":", 1)[0]        # Listener: f"{host}:{port}"
                    _record_peer(self.cfg, "connected", who, "hello agreed")
                    self.on_event("primary", primary="connected", peer=who, reason="hello agreed")
                    return self.admission.open(address) if self.admission is not None else None

                try:
                    why = peer.serve(session, lambda theirs: self._hello(sec, theirs),
                                     lambda n: self._checkpoint(sec, n),
                                     hash_s=lambda spans, piece: digests.of_spans(origin, spans, piece),
                                     on_hello=on_hello, switchover=_TakeOver(self.cfg, sec, self.fence),
                                     grow=lambda size: self._grow(sec, size))
                except (FrameError, OSError) as e:
                    why = f"the control link broke: {e}"
                finally:
                    self.session = None
                    session.close()
                    if self.admission is not None:
                        self.admission.close()      # a new NBD connection needs a new session
                if why == peer.SWITCHED_OVER:
                    _record_peer(self.cfg, "switched over", connected[0], "this host took over (switchover)")
                    self.on_event("switchover", peer=connected[0], checkpoint=sec.state().checkpoint)
                    self.switched_over = True
                    return
                if connected and not self.stopping():
                    log.warning("PRIMARY LOST: %s (%s); the active view stays at the last checkpoint; "
                                "`dmrepl failover %s` takes over there", connected[0], why, self.cfg.name)
                    _record_peer(self.cfg, "lost", connected[0], why)
                    self.on_event("primary", primary="lost", peer=connected[0], reason=why)
