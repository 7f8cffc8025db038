"""The primary's connection to its secondary: the control session and the NBD device, and the signs
that the secondary is lost.

    connect()   control link (key handshake), hello, NBD attach: all or nothing
    drop()      NBD sockets shut down and disconnected first (the kernel fails the leg's in-flight
                requests, so no write waits for a dead secondary), then the mirror's leg dropped
    signs       LINK_DEAD for an NBD connection, the secondary saying its nbdkit was restarted, a
                broken or silent control link, heartbeats unanswered for
                heartbeat_interval_s * heartbeat_misses: raised as `Lost`
    keepalive   a thread sends a heartbeat every heartbeat_interval_s while the session lives,
                also while the daemon's loop is busy (an initial sync, a resync's comparison):
                the secondary takes a silence longer than its timeout for a lost primary

The daemon owns the state machine; this class only says what happened.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time

from dmrepl import private
from dmrepl.config import PrimaryConfig
from dmrepl.daemon import peer
from dmrepl.daemon.machine import Event
from dmrepl.daemon.progress import log
from dmrepl.errors import DmreplError
from dmrepl.kernel import netns
from dmrepl.link import auth
from dmrepl.link.frames import FrameError, Kind
from dmrepl.link.session import Session
from dmrepl.nbd import netlink
from dmrepl.nbd.attach import Attached, AttachError, abort, attach, cut
from dmrepl.roles.hello import Hello
from dmrepl.roles.primary import Primary

FRAME_TIMEOUT = 5.0


CONNECTIONS_FILE = "nbd-connections.json"
POLITE_S = 1.0      # how long a dead daemon's NBD device may take to disconnect before it is cut


def remember_connections(cfg: PrimaryConfig, nbd: Attached) -> None:
    """The NBD device's connections, in the state dir: a daemon that takes over this one's stack
    after it died can then abort them (disconnect_left).  Best effort: without the record a
    takeover's disconnect may wait for the NBD timeout, nothing worse."""
    try:
        private.write_secret(os.path.join(cfg.resource_state_dir, CONNECTIONS_FILE),
                             json.dumps({"index": nbd.index, "endpoints": nbd.endpoints}) + "\n")
    except OSError as e:
        log(f"WARNING: cannot record the NBD connections in {cfg.resource_state_dir}: {e}")


def _forget_connections(cfg: PrimaryConfig) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(os.path.join(cfg.resource_state_dir, CONNECTIONS_FILE))


def _left_endpoints(cfg: PrimaryConfig, index: int) -> tuple[list, str]:
    """The connections a dead daemon recorded for /dev/nbd`index` (the record is used once), and
    why there are none."""
    path = os.path.join(cfg.resource_state_dir, CONNECTIONS_FILE)
    try:
        with open(path) as f:
            rec = json.load(f)
        if rec.get("index") != index:
            return [], f"the record is of /dev/nbd{rec.get('index')}, not /dev/nbd{index}"
        return [tuple(e) for e in rec["endpoints"]], ""
    except FileNotFoundError:
        return [], "no record of its connections"
    except (ValueError, KeyError, TypeError, AttributeError, OSError) as e:
        return [], f"its connections' record {path} is unreadable ({e})"
    finally:
        _forget_connections(cfg)


def disconnect_left(cfg: PrimaryConfig, nl: netlink.NBDNetlink, index: int) -> str:
    """Disconnect /dev/nbd`index`, which a dead daemon left; returns what was done, for the log.
    Politely first (NBD_CMD_DISC; a healthy secondary's nbdkit sees a clean end); if that has not
    returned within POLITE_S, a silent peer holds it (docs/kernel-notes.md) and a timer thread
    aborts the connections the dead daemon recorded, which lets it return.  The netlink socket
    stays on the calling thread."""
    endpoints, why = _left_endpoints(cfg, index)
    said = ["disconnected"]

    def cut_them():
        try:
            if not endpoints:
                said[0] = f"slow to disconnect; {why}"
                return
            with netns.inside(cfg.netns):       # `dmrepl down` runs outside the daemon's namespace
                said[0] = f"slow to disconnect: {abort(endpoints)} of its {len(endpoints)} connection(s) aborted"
        except (OSError, ValueError, DmreplError) as e:
            said[0] = f"slow to disconnect, and its connections could not be aborted ({e})"

    timer = threading.Timer(POLITE_S, cut_them)
    timer.daemon = True
    timer.start()
    try:
        nl.disconnect(index)
    finally:
        timer.cancel()
        timer.join()
    return said[0]


class Watchdog:
    """While armed, a thread that cuts the NBD sockets when the NBD device makes no progress for
    `after_s` with requests in flight: around a suspend that waits for the NBD leg's writes (a
    checkpoint's flush, a resync's switch of the mirror).  The loop cannot notice a lost
    secondary meanwhile -- it is inside the ioctl -- and the kernel gives a hung request up only
    after the NBD timeout, then may requeue it on the other connection for another one (a write
    held 11 s in the fault campaign).  Cut, the requests fail at once, the mirror completes them
    from P and marks the leg failed, the suspend returns, and the loop sees the failed leg:
    degraded, a resync later.  Progress, not time: a long flush of a live secondary (a frozen
    file system's writeback) completes requests all along and is never cut."""

    POLL_S = 0.1

    def __init__(self, nbd: Attached | None, after_s: float, what: str):
        self.nbd, self.after_s, self.what = nbd, after_s, what
        self.thread: threading.Thread | None = None
        self.done = threading.Event()
        self.fired = False

    def _counters(self) -> tuple[int, int]:
        """(requests completed, requests in flight) of the NBD device (/sys/block/nbdN/stat)."""
        with open(f"/sys/block/nbd{self.nbd.index}/stat") as f:
            v = [int(x) for x in f.read().split()]
        done = v[0] + v[4] + (v[11] if len(v) > 11 else 0) + (v[15] if len(v) > 15 else 0)
        return done, v[8]

    def _watch(self) -> None:
        try:
            last, _ = self._counters()
        except (OSError, ValueError, IndexError):
            return
        since = time.monotonic()
        while not self.done.wait(self.POLL_S):
            try:
                done, inflight = self._counters()
            except (OSError, ValueError, IndexError):
                return
            if done != last or not inflight:
                last, since = done, time.monotonic()
            elif time.monotonic() - since >= self.after_s:
                self.fired = True
                log(f"{self.what}: the NBD device completed nothing for {self.after_s:g} s with {inflight} "
                    "request(s) in flight: the secondary is taken for lost, its NBD connections are cut")
                cut(self.nbd)
                return

    def __enter__(self) -> "Watchdog":
        if self.nbd is not None:
            self.thread = threading.Thread(target=self._watch, name="nbd-watchdog", daemon=True)
            self.thread.start()
        return self

    def disarm(self) -> None:
        self.done.set()
        if self.thread is not None:
            self.thread.join()
            self.thread = None

    def __exit__(self, *exc) -> None:
        self.disarm()


class Lost(Exception):
    """A sign that the secondary is lost: the event for the state machine and the reason."""

    def __init__(self, event: Event, reason: str):
        super().__init__(reason)
        self.event, self.reason = event, reason


class SecondaryLink:
    def __init__(self, cfg: PrimaryConfig, pri: Primary, nl: netlink.NBDNetlink):
        self.cfg, self.pri, self.nl = cfg, pri, nl
        self.peer_cfg = cfg.secondaries[0]
        self.session: Session | None = None
        self.nbd: Attached | None = None
        self.dead_sockets = 0   # NBD connections the kernel reported dead (LINK_DEAD)
        self.next_attempt = 0.0  # degraded: when to try the secondary again
        self.last_error = ""
        self.split_brain: str | None = None    # the other host is primary too (hello, either way)

    @property
    def silence_s(self) -> float:
        """How long the secondary may stay silent before it is lost (heartbeats, checkpoint answers)."""
        return max(2.0, self.heartbeat_silence_s)

    @property
    def heartbeat_silence_s(self) -> float:
        """How long the secondary may send nothing while it has only heartbeats to answer (it
        answers them while it hashes, too): heartbeat interval x misses."""
        return self.cfg.heartbeat_interval_s * self.cfg.heartbeat_misses

    def hello(self) -> Hello:
        st = self.pri.state()
        return Hello(resource_id=self.cfg.resource_id, role="primary", size_bytes=self.pri.size_bytes(),
                     chunk_sectors=self.cfg.chunk_sectors, era_block_sectors=self.cfg.era_block_sectors,
                     checkpoints=[st.checkpoint] if st else [], heartbeat_timeout_s=self.silence_s)

    def connect(self) -> Hello:
        """Control link, hello and NBD attach; raises whatever fails (nothing is left open)."""
        p = self.peer_cfg
        try:
            self.session = Session.connect(p.link_host, p.link_port, auth.load_key(self.cfg.key_file))
        except (OSError, FrameError) as e:
            hint = "is the secondary up (`dmrepl up NAME` there) with the same key file?"
            if self.cfg.tunnel is not None and isinstance(e, TimeoutError):
                hint += (" Inside the WireGuard tunnel a silent peer is also one whose keys do not match: "
                         "each host's peer_public_key must be what `dmrepl keygen NAME --wireguard` prints on "
                         "the other, and peer_endpoint its address and listen_port")
            raise DmreplError(f"the secondary's control link at {p.link_host}:{p.link_port}: {e}", hint) from None
        try:
            try:
                theirs = peer.exchange_hello(self.session, self.hello())
            except peer.PeerRefused as e:
                if "SPLIT BRAIN" in str(e):
                    self.saw_split_brain(str(e))
                raise
            self.split_brain = None
            # Heartbeats from the hello on: the NBD attach below took over 2 s on a loaded host, and
            # a secondary that hears nothing for the heartbeat timeout ends the session.
            threading.Thread(target=self._keepalive, args=(self.session,), name="keepalive", daemon=True).start()
            # The session's export name from the secondary's gate; the resource id for an open export.
            self.nbd = attach(self.nl, p.nbd_host, p.nbd_port, theirs.export_name or self.cfg.resource_id,
                              expected_size_bytes=self.pri.size_bytes(), connections=self.cfg.nbd_connections,
                              timeout_s=self.cfg.nbd_timeout_s, keep_sockets=True)
        except BaseException:
            self.session.close()
            self.session = None
            raise
        self.dead_sockets = 0
        remember_connections(self.cfg, self.nbd)
        log(f"hello: the secondary at {self.session.peer} agrees (its checkpoints {theirs.checkpoints}); "
            f"NBD: {self.nbd.path} attached to {p.nbd_host}:{p.nbd_port} ({self.nbd.connections} connection(s))")
        return theirs

    def saw_split_brain(self, what: str) -> None:
        """Both hosts are primary: said once in the log, kept for `status` until a hello agrees."""
        if self.split_brain is None:
            log(f"SPLIT BRAIN: {what}")
        self.split_brain = what

    def reconnect(self) -> Hello | None:
        """Degraded: every reconnect_interval_s, connect(); the Hello once it works (each new
        reason it does not is logged once)."""
        if time.monotonic() < self.next_attempt:
            return None
        self.next_attempt = time.monotonic() + self.cfg.reconnect_interval_s
        try:
            theirs = self.connect()
        except (DmreplError, AttachError, FrameError, OSError) as e:
            if str(e) != self.last_error:
                log(f"reconnect: {e}; trying again every {self.cfg.reconnect_interval_s:g} s")
                self.last_error = str(e)
            return None
        self.last_error = ""
        return theirs

    def _keepalive(self, session: Session) -> None:
        while self.session is session:
            try:
                session.send(Kind.HEARTBEAT, {"t": time.time()})
            except OSError:
                return   # the loop notices the broken session itself
            time.sleep(self.cfg.heartbeat_interval_s)

    def watchdog(self, what: str) -> Watchdog:
        """A Watchdog over this link's NBD device (none attached: it does nothing), firing after the
        time the secondary may stay silent."""
        return Watchdog(self.nbd, self.silence_s, what)

    def drop(self, drop_leg, *, lost: bool = True) -> None:
        """Close the session, disconnect NBD, then `drop_leg()` (None: no stack built yet).

        For a lost secondary the NBD sockets are cut first (attach.cut): a sender blocked on a
        peer that acknowledges nothing would hold the disconnect, and every write, for one NBD
        timeout or more (7-16 s with a 4 s timeout, docs/kernel-notes.md).  The daemon's
        teardown (`lost=False`) disconnects politely: its stack is gone by then, so no write
        waits, though a secondary lost meanwhile may hold the daemon's exit as long.
        """
        if self.session is not None:
            self.session.close()
            self.session = None
        self.disconnect(drop_leg, lost=lost)

    def disconnect(self, drop_leg=None, *, lost: bool = False) -> None:
        """The NBD device disconnected (see drop); the control session stays (a switchover's)."""
        nbd, self.nbd = self.nbd, None
        if nbd is None:
            return
        if lost:
            cut(nbd)
        if self.nl.is_connected(nbd.index):
            self.nl.disconnect(nbd.index)
        cut(nbd)    # after a polite disconnect: closes this process's references only
        _forget_connections(self.cfg)
        if drop_leg is not None:
            drop_leg()
            log(f"NBD: {nbd.path} disconnected and dropped from the mirror")
        else:
            log(f"NBD: {nbd.path} disconnected")

    def on_link_events(self, events: netlink.LinkEvents) -> None:
        """LINK_DEAD is per socket: a socket that broke, or a request that outlived the NBD timeout
        (nbd.c: nbd_xmit_timeout marks that socket dead and requeues the request on another one).
        One dead connection is enough to drop the leg: when nbdkit died, the kernel sometimes
        reported one of two connections dead and let the other wait out the NBD timeout (15 s
        in tests/kernel/test_faults.py), all writes stalled behind it.  A false alarm (a slow
        request) now costs a reconnection and a delta resync, not a standstill."""
        for ev in events.wait(0):
            if self.nbd is None or ev.cmd != netlink.Cmd.LINK_DEAD or ev.index != self.nbd.index:
                continue
            self.dead_sockets += 1
            raise Lost(Event.LINK_DEAD, f"the kernel NBD client reported a connection of {self.nbd.path} dead "
                       f"({self.dead_sockets} of {self.nbd.connections}): its socket broke, or a request "
                       f"outlived nbd_timeout_s ({self.cfg.nbd_timeout_s} s)")

    def recv(self) -> tuple[Kind, dict]:
        try:
            kind, body = self.session.recv(timeout=FRAME_TIMEOUT)
        except (FrameError, OSError) as e:
            raise Lost(Event.LINK_ERROR, f"the control link broke: {e}") from None
        if kind == Kind.EXPORT_RESTARTED:
            raise Lost(Event.LINK_DEAD, f"the secondary's nbdkit died ({body.get('reason')}): "
                       "its NBD connections are gone")
        return kind, body

    def heartbeat(self, now: float) -> None:
        """Raise Lost if the secondary answered nothing for too long (the keepalive thread sends)."""
        session = self.session
        silent = now - session.last_recv if session is not None else 0.0
        if session is not None and silent > self.heartbeat_silence_s:
            raise Lost(Event.HEARTBEAT_MISSED, f"the secondary answered no heartbeat for {silent:.1f} s "
                       f"({self.cfg.heartbeat_misses} missed)")
