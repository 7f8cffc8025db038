"""The primary's daemon: `dmrepl up NAME` in the foreground (systemd runs it as it is).

    start:  control link -> hello -> NBD attach -> initial sync (or --assume-clean) -> mirror + era
            -> checkpoint 1 on both hosts -> replicating
    loop:   checkpoints every `checkpoint_interval_s` and on demand (CLI, or the secondary's early
            request); heartbeats; LINK_DEAD from the kernel, a failed mirror leg or missed heartbeats
            -> "disconnected" with the reason (dropping the leg and resync come later)
    stop:   SIGTERM or `dmrepl down NAME`: mirror and era removed, NBD disconnected

One thread owns the link, the kernel handles and the state machine; the
control socket's threads hand it their requests through a queue, so that no
two threads ever read the same socket or ioctl handle.  Logs go to stderr
(the journal under systemd).
"""

from __future__ import annotations

import os
import queue
import select
import signal
import socket
import sys
import time
from concurrent.futures import Future

from pyroute2 import netns

from dmrepl.config import PrimaryConfig
from dmrepl.daemon import control, peer
from dmrepl.daemon.machine import Event, Machine, State
from dmrepl.errors import DmreplError
from dmrepl.kernel import modules
from dmrepl.link import auth
from dmrepl.link.frames import FrameError, Kind
from dmrepl.link.session import Session
from dmrepl.nbd import netlink
from dmrepl.nbd.attach import Attached, AttachError, attach
from dmrepl.roles.hello import Hello
from dmrepl.roles.primary import Devices, Primary, sync

REQUEST_TIMEOUT = 60.0


def log(msg: str) -> None:
    print(time.strftime("%Y-%m-%d %H:%M:%S ") + msg, file=sys.stderr, flush=True)


class Progress:
    """The initial sync's progress on stderr: a live line on a terminal, every 10 % in a log."""

    def __init__(self, stopping=lambda: False):
        self.stopping = stopping
        self.tty = sys.stderr.isatty()
        self.t0 = time.monotonic()
        self.shown = -1

    def __call__(self, phase: str, done: int, total: int) -> None:
        if self.stopping():
            raise DmreplError(f"initial sync stopped at {done >> 20} of {total >> 20} MiB ({phase})",
                              "S is incomplete: the next start copies it again")
        pct = 100 * done // max(total, 1)
        rate = done / max(time.monotonic() - self.t0, 1e-6) / 1e6
        if self.tty:
            bar = "#" * (pct // 4)
            print(f"\r{phase:6} [{bar:<25}] {pct:3d}%  {rate:7.1f} MB/s", end="", file=sys.stderr, flush=True)
            if done >= total:
                print(file=sys.stderr)
                self.t0 = time.monotonic()
        elif pct // 10 != self.shown // 10 or done >= total:
            log(f"initial sync: {phase} {pct}% ({done >> 20} of {total >> 20} MiB, {rate:.1f} MB/s)")
            if done >= total:
                self.t0, pct = time.monotonic(), -1
        self.shown = pct


class PrimaryDaemon:
    def __init__(self, cfg: PrimaryConfig, pri: Primary, nl: netlink.NBDNetlink, events: netlink.LinkEvents):
        self.cfg, self.pri, self.nl, self.events = cfg, pri, nl, events
        self.peer_cfg = cfg.secondaries[0]
        self.machine = Machine()
        self.session: Session | None = None
        self.nbd: Attached | None = None
        self.devs: Devices | None = None
        self.requests: queue.Queue = queue.Queue()
        self.wake_r, self.wake_w = socket.socketpair()
        self.stopping = False
        self.last_answer = time.monotonic()
        self.last_checkpoint: dict = {}
        self.built = False
        self.dead_sockets = 0   # NBD connections the kernel reported dead (LINK_DEAD)

    # -- start ------------------------------------------------------------------

    def hello(self) -> Hello:
        st = self.pri.state()
        return Hello(resource_id=self.cfg.resource_id, role="primary", size_bytes=self.pri.size_bytes(),
                     chunk_sectors=self.cfg.chunk_sectors, era_block_sectors=self.cfg.era_block_sectors,
                     checkpoints=[st.checkpoint] if st else [])

    def start(self, assume_clean: bool) -> None:
        for module in ("nbd", "dm-mirror", "dm-era"):
            why = modules.load(module)
            if why is not None:
                raise DmreplError(f"kernel module {module} cannot be loaded: {why}", "`dmrepl doctor` checks this host")
        st = self.pri.check()
        p = self.peer_cfg
        key = auth.load_key(self.cfg.key_file)
        try:
            self.session = Session.connect(p.link_host, p.link_port, key)
        except (OSError, FrameError) as e:
            raise DmreplError(f"the secondary's control link at {p.link_host}:{p.link_port}: {e}",
                              "is the secondary up (`dmrepl up NAME` there) with the same key file?") from None
        theirs = peer.exchange_hello(self.session, self.hello())
        log(f"hello: the secondary at {self.session.peer} agrees (its checkpoints {theirs.checkpoints})")
        if st is not None and st.checkpoint not in theirs.checkpoints:
            raise DmreplError(f"this host is at checkpoint {st.checkpoint}, the secondary at "
                              f"{theirs.checkpoints}: the disks may differ",
                              "a delta resync is not implemented yet: start both afresh (move the state "
                              "directories away) to copy the whole disk")
        self.devs = self.pri.attach()
        self.nbd = attach(self.nl, p.nbd_host, p.nbd_port, self.cfg.resource_id,
                          expected_size_bytes=self.pri.size_bytes(), connections=self.cfg.nbd_connections,
                          timeout_s=self.cfg.nbd_timeout_s)
        log(f"NBD: {self.nbd.path} attached to {p.nbd_host}:{p.nbd_port} ({self.nbd.connections} connection(s))")
        if st is None and not assume_clean:
            self.machine.fire(Event.CONNECTED, "first start: S gets a full copy of P")
            log("initial sync: copying P to S, then comparing digests")
            # Half the secondary's store per segment, a checkpoint (number 0 again: S is not yet a
            # copy of P, no view is worth keeping) between segments to empty it.
            session = self.session
            res = sync.initial_sync(self.devs.disk, self.nbd.path, progress=Progress(lambda: self.stopping),
                                    segment_bytes=theirs.store_bytes // 2 or None,
                                    between=lambda: peer.remote_checkpoint(session, 0))
            log(f"initial sync: {res.copied_bytes >> 20} MiB copied in {res.copy_seconds:.1f} s "
                f"({res.copy_mb_s:.1f} MB/s), verified in {res.verify_seconds:.1f} s")
            event, why = Event.SYNCED, "initial sync verified"
        else:
            event = Event.CONNECTED_IN_SYNC
            why = "--assume-clean" if st is None else f"both hosts hold checkpoint {st.checkpoint}"
        self.pri.up(self.devs, self.nbd.path)
        self.built = True
        log(f"up: {self.pri.top_path} replicates to the secondary")
        # The first checkpoint makes the secondary's view P as it is now: before it, the view is
        # whatever S held (before the sync, or at the last checkpoint).
        self._checkpoint("start")
        self.machine.fire(event, why)

    # -- the loop -----------------------------------------------------------------

    def run(self) -> None:
        interval = self.cfg.checkpoint_interval_s
        hb = self.cfg.heartbeat_interval_s
        next_cp = time.monotonic() + interval if interval else float("inf")
        next_hb = time.monotonic() + hb
        self.last_answer = time.monotonic()
        while not self.stopping:
            now = time.monotonic()
            timeout = max(0.0, min(next_cp, next_hb) - now)
            fds = [self.events.fileno(), self.wake_r.fileno()]
            if self.session is not None:
                fds.append(self.session.sock.fileno())
            ready, _, _ = select.select(fds, [], [], timeout)
            if self.wake_r.fileno() in ready:
                self.wake_r.recv(4096)
            self.serve_requests()
            if self.events.fileno() in ready:
                self.on_link_events()
            if self.session is not None and self.session.sock.fileno() in ready:
                self.on_peer_frame()
            now = time.monotonic()
            if now >= next_hb:
                self.heartbeat(now)
                next_hb = now + hb
            self.watch_mirror()
            if now >= next_cp:
                if self.machine.state == State.REPLICATING:
                    self.checkpoint("interval")
                next_cp = time.monotonic() + interval

    def lost(self, event: Event, reason: str) -> None:
        if self.machine.fire(event, reason):
            log(f"DISCONNECTED: {reason}; writes reach P only (era records them)")
        if self.session is not None:
            self.session.close()
            self.session = None

    def on_link_events(self) -> None:
        """LINK_DEAD is per socket: a socket that broke, or a request that outlived the NBD timeout
        (nbd.c: nbd_xmit_timeout marks that socket dead and requeues the request on another one).
        With several connections the device goes on with the others: the link is dead only when
        every one has been reported (or the mirror fails the leg, or heartbeats go unanswered)."""
        for ev in self.events.wait(0):
            if self.nbd is None or ev.cmd != netlink.Cmd.LINK_DEAD or ev.index != self.nbd.index:
                continue
            self.dead_sockets += 1
            total = self.nbd.connections
            if self.dead_sockets >= total:
                self.lost(Event.LINK_DEAD, f"the kernel NBD client reported all {total} connection(s) of "
                          f"{self.nbd.path} dead")
            else:
                log(f"WARNING: the kernel NBD client reported a connection of {self.nbd.path} dead "
                    f"({self.dead_sockets} of {total}): a request outlived nbd_timeout_s "
                    f"({self.cfg.nbd_timeout_s} s) or its socket broke; the others carry on")

    def on_peer_frame(self) -> None:
        try:
            kind, body = self.session.recv(timeout=5.0)
        except (FrameError, OSError) as e:
            self.lost(Event.LINK_ERROR, f"the control link broke: {e}")
            return
        self.last_answer = time.monotonic()
        if kind == Kind.EARLY_CHECKPOINT and self.machine.state == State.REPLICATING:
            log(f"the secondary asks for an early checkpoint ({body.get('reason', 'store filling')})")
            self.checkpoint("early request")

    def heartbeat(self, now: float) -> None:
        if self.machine.state != State.REPLICATING or self.session is None:
            return
        silent = now - self.last_answer
        limit = self.cfg.heartbeat_interval_s * self.cfg.heartbeat_misses
        if silent > limit:
            self.lost(Event.HEARTBEAT_MISSED, f"the secondary answered no heartbeat for {silent:.1f} s "
                      f"({self.cfg.heartbeat_misses} missed)")
            return
        try:
            self.session.send(Kind.HEARTBEAT, {"t": time.time()})
        except OSError as e:
            self.lost(Event.LINK_ERROR, f"the control link broke: {e}")

    def watch_mirror(self) -> None:
        if self.machine.state != State.REPLICATING:
            return
        health = self.pri.kernel_status().get("mirror_health", "")
        if len(health) > 1 and health[1] != "A":
            self.lost(Event.LEG_FAILED, f"the mirror marked the NBD leg failed (health {health})")

    def checkpoint(self, why: str) -> dict:
        self.machine.refuse_unless("checkpoint", self.cfg.name)
        return self._checkpoint(why)

    def _checkpoint(self, why: str) -> dict:
        session = self.session
        try:
            st, pause, peer_pause = self.pri.checkpoint(lambda n: peer.remote_checkpoint(session, n))
        except (FrameError, OSError) as e:
            self.lost(Event.LINK_ERROR, f"the control link broke during a checkpoint: {e}")
            raise DmreplError(f"checkpoint failed: the control link broke ({e})",
                              "both hosts stay at the previous checkpoint") from None
        except DmreplError as e:
            if self.machine.state == State.REPLICATING:
                self.machine.fire(Event.CHECKPOINT_FAILED, str(e))
            log(f"checkpoint failed ({why}): {e}")
            raise
        self.last_answer = time.monotonic()
        self.last_checkpoint = {"checkpoint": st.checkpoint, "pause_ms": round(pause * 1000, 3),
                                "secondary_pause_ms": round(peer_pause * 1000, 3), "time": time.time(),
                                "why": why}
        if why != "interval":
            log(f"checkpoint {st.checkpoint} ({why}): pause {pause * 1000:.1f} ms "
                f"(secondary {peer_pause * 1000:.1f} ms)")
        return dict(self.last_checkpoint)

    # -- requests from the control socket ---------------------------------------------

    def submit(self, request: dict) -> dict:
        """Called on a control-socket thread.  `status` and `stop` are answered here (status with a
        device-mapper handle of its own), so that they work while the loop is busy (an initial
        sync); a checkpoint is handed to the loop, which owns the link."""
        op = request["op"]
        if op == "status":
            with Primary.open(self.cfg) as pri:
                return status_reply(self, pri)
        if op == "stop":
            with Primary.open(self.cfg) as pri:
                self.refuse_stop_while_open(pri)
            self.stopping = True
            self.wake_w.send(b"x")
            return {"stopping": True}
        if op != "checkpoint":
            raise DmreplError(f"unknown request {op!r}", "the daemon answers status, checkpoint, stop")
        if self.machine.state != State.REPLICATING:
            self.machine.refuse_unless("checkpoint", self.cfg.name)
        fut: Future = Future()
        self.requests.put((request, fut))
        self.wake_w.send(b"x")
        return fut.result(timeout=REQUEST_TIMEOUT)

    def serve_requests(self) -> None:
        while True:
            try:
                _request, fut = self.requests.get_nowait()
            except queue.Empty:
                return
            try:
                fut.set_result(self.checkpoint("on demand"))
            except Exception as e:  # noqa: BLE001 -- handed to the caller, who reports it
                fut.set_exception(e)

    def refuse_stop_while_open(self, pri: Primary) -> None:
        top = pri.devices().get("top")
        if top and top["open_count"]:
            raise DmreplError(f"{pri.top_path} is open ({top['open_count']} opener(s))",
                              "stop the consumer first; replication goes on meanwhile")

    # -- stop -----------------------------------------------------------------------

    def teardown(self) -> None:
        """Undo what this daemon made (never a stack another one built)."""
        if self.built:
            try:
                self.refuse_stop_while_open(self.pri)
            except DmreplError:
                log(f"{self.pri.top_path} is still open: its devices are kept; writes reach P "
                    "(and S while the NBD link lives) but no checkpoint is taken")
                return
            for line in self.pri.down(self.devs):
                log(f"removed {line}")
        elif self.devs is not None:
            Primary.detach(list(self.devs.loops))
        if self.nbd is not None and self.nl.is_connected(self.nbd.index):
            self.nl.disconnect(self.nbd.index)
            log(f"NBD: {self.nbd.path} disconnected")
        if self.session is not None:
            self.session.close()


def status_reply(d: "PrimaryDaemon", pri: Primary) -> dict:
    """What `dmrepl status NAME` shows: the daemon's state and reason, the state file, the kernel."""
    st = pri.state()
    m = d.machine
    return {"name": d.cfg.name, "resource_id": d.cfg.resource_id, "role": "primary",
            "state": str(m.state), "reason": m.reason, "since": m.since, "pid": os.getpid(),
            "checkpoint": st.checkpoint if st else None, "last_checkpoint": d.last_checkpoint,
            "device": pri.top_path, "nbd": d.nbd.path if d.nbd else None,
            "nbd_connections": d.nbd.connections if d.nbd else None,
            "nbd_dead_connections": d.dead_sockets,
            "secondary": f"{d.peer_cfg.link_host}:{d.peer_cfg.link_port}",
            "checkpoint_interval_s": d.cfg.checkpoint_interval_s,
            "devices": pri.devices(), **pri.kernel_status(),
            "history": [{"time": t, "event": e, "state": s, "reason": r} for t, e, s, r in m.history]}


def enter_netns(name: str) -> None:
    """Make this process's sockets in network namespace `name` from now on.

    The kernel's nbd generic netlink family exists in the initial namespace
    only (drivers/block/nbd.c registers it without netnsok; a genl socket in
    another namespace gets ENOENT for "nbd"): so the daemon opens its netlink
    sockets first, then moves, and its TCP sockets to the secondary -- which
    the kernel NBD client takes over -- live in `name` (docs/kernel-notes.md).
    """
    try:
        netns.setns(name, flags=0)
    except OSError as e:
        raise DmreplError(f"cannot enter network namespace {name!r}: {e.strerror or e}",
                          "check `ip netns list`, or remove 'netns' from the config") from None


def run(cfg: PrimaryConfig, *, assume_clean: bool = False) -> int:
    """The daemon, in the foreground, until SIGTERM/SIGINT or `dmrepl down`; returns the exit status."""
    with Primary.open(cfg) as pri, netlink.NBDNetlink() as nl, netlink.LinkEvents() as events:
        if cfg.netns is not None:
            enter_netns(cfg.netns)
        d = PrimaryDaemon(cfg, pri, nl, events)

        def on_term(signum, frame):
            d.stopping = True
            d.wake_w.send(b"x")

        signal.signal(signal.SIGTERM, on_term)
        signal.signal(signal.SIGINT, on_term)
        server = control.ControlServer(control.socket_path(cfg.resource_state_dir), d.submit, log)
        try:
            try:
                d.start(assume_clean)
            except (DmreplError, AttachError, FrameError, OSError) as e:
                d.machine.fire(Event.START_FAILED, str(e))
                log(f"could not start: {e}")
                d.teardown()
                raise
            every = (f"every {cfg.checkpoint_interval_s:g} s and on demand" if cfg.checkpoint_interval_s
                     else "on demand only")
            log(f"replicating; checkpoints {every}; control socket {server.path}")
            d.run()
            d.machine.fire(Event.STOP, "stop requested")
            log("stopping")
            d.teardown()
            return 0
        finally:
            server.close()
