"""The primary's daemon: `dmrepl up NAME` in the foreground (systemd runs it as it is).

    start:  control link -> hello -> NBD attach -> mirror + era, then
              first start: initial sync (or --assume-clean) -> checkpoint 1 on both hosts
              a restart:   delta resync from the newest common checkpoint (primary_resync.py);
                           without the secondary: up degraded, writes on P only
            -> replicating
    loop:   checkpoints every `checkpoint_interval_s` and on demand (CLI, or the secondary's early
            request); heartbeats; LINK_DEAD from the kernel, a failed mirror leg or missed heartbeats
            -> "degraded" with the reason: NBD disconnected (in-flight writes complete from P), the
            leg dropped, era records; every `reconnect_interval_s` a new hello -> delta resync
            -> a checkpoint joins the hosts -> replicating
    stop:   SIGTERM or `dmrepl down NAME`: mirror and era removed, NBD disconnected

One thread owns the link, the kernel handles and the state machine; the
control socket's threads hand it their requests through a queue, so that no
two threads ever read the same socket or ioctl handle.  Logs go to stderr
(the journal under systemd).
"""

from __future__ import annotations

import contextlib
import os
import queue
import select
import signal
import socket
import time
from concurrent.futures import Future

from dmrepl.config import PrimaryConfig
from dmrepl.config.fencing import check_runnable
from dmrepl.daemon import control, handover, metrics, peer, primary_start, resize, switchover, tunnel
from dmrepl.daemon.events import EventLog
from dmrepl.daemon.fencing import PeerFencing
from dmrepl.daemon.machine import Event, Machine, State
from dmrepl.daemon.notify import Notifier
from dmrepl.daemon.preload import preload
from dmrepl.daemon.primary_link import Lost, SecondaryLink
from dmrepl.daemon.primary_resync import Resync, ResyncStopped
from dmrepl.daemon.progress import Progress, log
from dmrepl.daemon.split_brain import HelloResponder
from dmrepl.daemon.verify import Verify
from dmrepl.errors import DmreplError
from dmrepl.kernel import dm, netns
from dmrepl.link.frames import FrameError, Kind
from dmrepl.nbd import netlink
from dmrepl.nbd.attach import AttachError
from dmrepl.roles.hello import Hello
from dmrepl.roles.primary import Devices, Primary, ResyncBase
from dmrepl.roles.primary.rate import Controller, Limits

REQUEST_TIMEOUT = 60.0


class PrimaryDaemon:
    def __init__(self, cfg: PrimaryConfig, pri: Primary, nl: netlink.NBDNetlink, events: netlink.LinkEvents,
                 notifier: Notifier, host_netns_fd: int | None = None):
        self.cfg, self.pri, self.nl, self.events = cfg, pri, nl, events
        self.machine = Machine()
        self.link = SecondaryLink(cfg, pri, nl)
        self.devs: Devices | None = None
        self.requests: queue.Queue = queue.Queue()
        self.wake_r, self.wake_w = socket.socketpair()
        self.stopping = False
        self.last_checkpoint: dict = {}
        self.built = False
        self.resync: Resync | None = None
        self.last_resync: dict = {}
        self.notifier = notifier
        self.eventlog = EventLog(cfg.resource_state_dir, cfg.name, "primary")
        self.pauses = metrics.PauseHistogram()
        self.sync: Progress | None = None      # the initial sync's, while it runs
        self.verifying: Verify | None = None   # a verify, while it runs (between the loop's other work)
        self.last_verify: dict = {}
        # A copy's limits (initial sync, resyncs): the config's, changed at run time by `dmrepl tune`.
        self.copy_rate = Controller(Limits(cfg.resync_min_bytes_s, cfg.resync_max_bytes_s, cfg.resync_share),
                                    pri.consumer_written_bytes)
        self.next_verify = self._verify_due()
        self.fencing = PeerFencing(cfg, log, self.eventlog.emit, host_netns_fd)
        self.checkpoint_in_doubt = False       # one failed since the last that succeeded: S may hold it
        self.handover = False                  # a switchover made this host the other's secondary
        self.exit_status = 0
        self.machine.on_move = self._moved

    def _moved(self, m: Machine, previous: State, event: Event) -> None:
        self.notifier.status(self.status_line())
        self.eventlog.emit("state", state=str(m.state), previous=str(previous), cause=str(event), reason=m.reason)
        behind = (State.DEGRADED, State.RESYNCING)
        if self.cfg.fencing is not None and (m.state in behind and previous not in behind
                                             or event == Event.CHECKPOINT_FAILED):
            # No checkpoint will reach the secondary for a while: its view falls behind by more than
            # an interval from now on (daemon/fencing.py).
            st = self.pri.state()
            self.fencing.outdate((st.checkpoint if st else 0) + self.checkpoint_in_doubt, m.reason)

    def status_line(self) -> str:
        """systemd's STATUS=: role, state and reason, checkpoint."""
        m, n = self.machine, self.last_checkpoint.get("checkpoint")
        if n is None:
            st = self.pri.state()
            n = st.checkpoint if st else None
        return f"primary, {m.state} ({m.reason})" + (f", checkpoint {n}" if n is not None else "")

    # -- start ------------------------------------------------------------------

    def start(self, assume_clean: bool) -> None:
        primary_start.start(self, assume_clean)

    # -- the loop -----------------------------------------------------------------

    def run(self) -> None:
        """Wakes on the NBD link's netlink events, the control link, a dm event (a leg the mirror
        marked failed: the armed control fd, docs/kernel-notes.md), a request, or the next
        heartbeat or checkpoint."""
        with dm.Control() as dm_events:
            dm_events.arm_events()
            self._loop(dm_events)

    def _loop(self, dm_events: dm.Control) -> None:
        interval = self.cfg.checkpoint_interval_s
        hb = self.cfg.heartbeat_interval_s
        next_cp = time.monotonic() + interval if interval else float("inf")
        next_hb = time.monotonic() + hb
        while not self.stopping:
            now = time.monotonic()
            timeout = max(0.0, min(next_cp, next_hb) - now)
            if self.machine.state in (State.RESYNCING, State.DEGRADED):
                timeout = min(timeout, 0.2)
            if self.verifying is not None:
                timeout = min(timeout, max(0.0, self.verifying.due - now))
            elif self.next_verify < float("inf"):
                timeout = min(timeout, max(0.0, self.next_verify - now))
            session = self.link.session
            fds = [self.events.fileno(), self.wake_r.fileno(), dm_events.fileno()] + \
                ([session.sock.fileno()] if session else [])
            ready, _, _ = select.select(fds, [], [], timeout)
            if self.wake_r.fileno() in ready:
                self.wake_r.recv(4096)
            if dm_events.fileno() in ready:
                dm_events.arm_events()      # before the kernel's status is read below
            self.serve_requests()
            try:
                if self.events.fileno() in ready:
                    self.link.on_link_events(self.events)
                if session is not None and session is self.link.session and session.sock.fileno() in ready:
                    self.on_peer_frame()
                now = time.monotonic()
                if now >= next_hb:
                    next_hb = now + hb
                    if self.machine.state in (State.REPLICATING, State.RESYNCING):
                        self.link.heartbeat(now)
            except Lost as e:
                self.lost(e.event, e.reason)
            self.copy_rate.sample()         # the consumer's write rate, for a copy's limit
            watching = self.machine.state in (State.REPLICATING, State.RESYNCING)
            kernel = self.pri.kernel_status() if watching else {}     # one read for both below
            self.watch_mirror(kernel)
            self.step_resync(kernel)
            self.step_verify()
            if now >= next_cp:
                if self.machine.state == State.REPLICATING:
                    self.checkpoint("interval")
                next_cp = time.monotonic() + interval

    def lost(self, event: Event, reason: str) -> None:
        if self.machine.fire(event, reason):
            log(f"DEGRADED: {reason}; the NBD leg is dropped, writes reach P only (era records them)")
        self.link.next_attempt = time.monotonic() + self.cfg.reconnect_interval_s
        if self.resync is not None:
            self.last_resync = {**self.resync.status(), "phase": "interrupted"}
            self.resync = None
        self.stop_verify(f"verify stopped: {reason}")
        self.link.drop((lambda: self.pri.drop_leg(self.devs)) if self.built else None)

    def try_reconnect(self) -> None:
        theirs = self.link.reconnect() if self.machine.state == State.DEGRADED else None
        if theirs is not None:
            self.pri.add_leg(self.devs, self.link.nbd.path)
            self.begin_resync(theirs)

    def begin_resync(self, theirs: Hello) -> None:
        base = self.pri.resync_base(theirs.checkpoints, theirs.diverged)
        self.machine.fire(Event.RECONNECTED, f"resync: {base.describe()}")
        self.resync = Resync(self.pri, self.devs, self.link.nbd.path, self.link.session, base,
                             self.link.heartbeat_silence_s, stopping=lambda: self.stopping, rate=self.copy_rate)
        try:
            self.resync.begin()
        except ResyncStopped:
            log(f"resync: stopped while comparing ({self.resync.compared} pieces compared); the next start "
                "compares again")
        except (FrameError, OSError) as e:   # ExportRestarted: the NBD connections died with nbdkit
            event = (Event.LINK_DEAD if isinstance(e, peer.ExportRestarted) else
                     Event.HEARTBEAT_MISSED if isinstance(e, peer.PeerSilent) else Event.LINK_ERROR)
            self.lost(event, f"the resync's comparison stopped: {e}")
        except (DmreplError, ValueError) as e:     # ValueError: a digest request this disk cannot make
            self.lost(Event.RESYNC_FAILED, f"resync failed: {e}")

    def step_resync(self, kernel: dict) -> None:
        self.try_reconnect()
        if self.machine.state != State.RESYNCING or self.resync is None:
            return
        try:
            with self.link.watchdog("the resync's switch of the mirror"):
                if not self.resync.poll(kernel):
                    return
        except DmreplError as e:
            self.lost(Event.RESYNC_FAILED, f"resync failed: {e}")
            return
        self.last_resync = self.resync.status()
        summary = self.resync.summary()
        self.resync = None
        try:
            self._checkpoint("resync done")
        except DmreplError as e:
            if self.machine.state == State.RESYNCING:
                self.lost(Event.RESYNC_FAILED, f"the checkpoint that ends the resync failed: {e}")
            return
        self.machine.fire(Event.RESYNCED, summary)
        log(f"{summary}; replicating")

    def on_peer_frame(self) -> None:
        kind, body = self.link.recv()
        if kind == Kind.EARLY_CHECKPOINT and self.machine.state == State.REPLICATING:
            log(f"the secondary asks for an early checkpoint ({body.get('reason', 'store filling')})")
            self.checkpoint("early request")
        elif kind == Kind.EARLY_CHECKPOINT:
            log(f"WARNING: the secondary's store is filling ({body.get('reason')}) while {self.machine.state}: "
                "no checkpoint before the resync is done (S's view must stay at the last one)")

    def watch_mirror(self, kernel: dict) -> None:
        if self.machine.state not in (State.REPLICATING, State.RESYNCING):
            return
        health = kernel.get("mirror_health") or ""
        if len(health) > 1 and health[1] != "A":
            self.lost(Event.LEG_FAILED, f"the mirror marked the NBD leg failed (health {health})")

    def checkpoint(self, why: str) -> dict:
        self.machine.refuse_unless("checkpoint", self.cfg.name)
        return self._checkpoint(why)

    def _checkpoint(self, why: str) -> dict:
        session = self.link.session

        def remote(n: int) -> float:
            guard.disarm()          # the flush is done: from here the peer's answer has its own timeout
            return peer.remote_checkpoint(session, n, self.link.silence_s)

        try:
            with self.link.watchdog(f"checkpoint ({why})'s flush") as guard:
                st, pause, peer_pause = self.pri.checkpoint(remote)
        except (FrameError, OSError) as e:
            self.checkpoint_in_doubt = True
            if self.machine.state in (State.REPLICATING, State.RESYNCING):
                self.lost(Event.LINK_ERROR, f"the control link broke during a checkpoint: {e}")
            raise DmreplError(f"checkpoint failed: the control link broke ({e})",
                              "both hosts stay at the previous checkpoint") from None
        except DmreplError as e:
            self.checkpoint_in_doubt = True
            if self.machine.state == State.REPLICATING:
                self.machine.fire(Event.CHECKPOINT_FAILED, str(e))
            log(f"checkpoint failed ({why}): {e}")
            raise
        self.checkpoint_in_doubt = False
        self.last_checkpoint = {"checkpoint": st.checkpoint, "pause_ms": round(pause * 1000, 3),
                                "secondary_pause_ms": round(peer_pause * 1000, 3), "time": time.time(),
                                "why": why}
        if why != "interval":
            log(f"checkpoint {st.checkpoint} ({why}): pause {pause * 1000:.1f} ms "
                f"(secondary {peer_pause * 1000:.1f} ms)")
        self.pauses.observe(pause)
        self.fencing.clear(st.checkpoint)          # the secondary's view holds every write again
        self.notifier.status(self.status_line())
        self.eventlog.emit("checkpoint", **{k: v for k, v in self.last_checkpoint.items() if k != "time"})
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
                pri.refuse_while_open()
            self.stopping = True
            self.wake_w.send(b"x")
            return {"stopping": True}
        if op == "tune":
            return self.tune(request)
        if op not in ("checkpoint", "verify", "switchover", "resize"):
            raise DmreplError(f"unknown request {op!r}",
                              "the daemon answers status, checkpoint, verify, switchover, resize, tune, stop")
        self.machine.refuse_unless(op, self.cfg.name)
        fut: Future = Future()
        self.requests.put((request, fut))
        self.wake_w.send(b"x")
        return fut.result(timeout=REQUEST_TIMEOUT if op == "checkpoint" else None)

    def serve_requests(self) -> None:
        while True:
            try:
                request, fut = self.requests.get_nowait()
            except queue.Empty:
                return
            try:
                self.machine.refuse_unless(request["op"], self.cfg.name)
                if request["op"] == "checkpoint":
                    fut.set_result(self.checkpoint("on demand"))
                elif request["op"] == "switchover":
                    fut.set_result(switchover.switchover(self))
                elif request["op"] == "resize":
                    fut.set_result(resize.resize(self))
                else:       # answered when the verify (this one, or one already running) ends
                    self.start_verify("on demand", request.get("rate_bytes_s"), bool(request.get("repair")), fut)
            except Exception as e:  # noqa: BLE001 -- handed to the caller, who reports it
                fut.set_exception(e)

    def tune(self, request: dict) -> dict:
        """New copy limits from now on, for the copy running too (the next batch, the initial
        sync's next piece); the config's come back at the next start."""
        old = self.copy_rate.limits
        try:
            new = old.changed(floor_bytes_s=request.get("resync_min"), ceiling_bytes_s=request.get("resync_max"),
                              share=request.get("resync_share"))
        except ValueError as e:
            raise DmreplError(f"{self.cfg.name}: tune refused: {e}", "nothing changed") from None
        self.copy_rate.limits = new
        self.wake_w.send(b"x")
        log(f"tune: resync limits {describe(old)} -> {describe(new)}")
        self.eventlog.emit("tune", **new.fields())
        return {"before": old.fields(), "now": self.copy_rate.status()}

    # -- verify ---------------------------------------------------------------------------

    def start_verify(self, why: str, rate: int | None, repair: bool, waiter: Future | None = None) -> None:
        """A verify of all of P against S, stepped by the loop (daemon/verify.py); a request while
        one runs waits for that one's report (and asks it to repair)."""
        if self.verifying is None:
            self.verifying = Verify(self.pri, self.devs, self.link.session, self.link.heartbeat_silence_s,
                                    rate_bytes_s=rate, repair=repair, why=why)
            limit = f" at most {rate >> 20} MiB/s" if rate else ""
            log(f"verify ({why}): comparing {self.verifying.size >> 20} MiB{limit}")
            self.eventlog.emit("verify-started", why=why, rate_limit_bytes_s=rate)
        else:
            self.verifying.repair |= repair
        if waiter is not None:
            self.verifying.waiters.append(waiter)

    def _verify_due(self) -> float:
        """When the schedule's next verify is due (time.monotonic()): an interval after now; never without one."""
        return time.monotonic() + self.cfg.verify_interval_s if self.cfg.verify_interval_s else float("inf")

    def step_verify(self) -> None:
        now = time.monotonic()
        if self.verifying is None:
            if now >= self.next_verify and self.machine.state == State.REPLICATING:
                self.start_verify("schedule", self.cfg.verify_rate_bytes_s, self.cfg.verify_repair)
            return
        if self.machine.state != State.REPLICATING:
            self.stop_verify(f"verify stopped: the resource is {self.machine.state} ({self.machine.reason})")
            return
        if now < self.verifying.due:
            return
        try:
            if not self.verifying.step():
                return
        except (FrameError, OSError) as e:
            self.lost(Event.LINK_ERROR, f"the control link broke during verify: {e}")
            return
        except DmreplError as e:    # a pause that could not be taken (the suspend failed)
            self.stop_verify(f"verify failed: {e}")
            return
        job, self.verifying = self.verifying, None
        self.next_verify = self._verify_due()
        report = job.report()
        if job.repair and job.differing:
            self.machine.fire(Event.REPAIR, f"verify --repair: {len(job.differing)} piece(s) differ")
            self.resync = Resync(self.pri, self.devs, self.link.nbd.path, self.link.session,
                                 ResyncBase(None, None), self.link.heartbeat_silence_s, rate=self.copy_rate)
            self.resync.begin(known=(job.region, sorted(job.differing)))
            report["repair"] = "started: `dmrepl status` shows the resync"
        self.last_verify = report
        self.eventlog.emit("verify", **{k: report[k] for k in (
            "why", "compared_bytes", "differing_bytes", "differing", "seconds", "frozen_pieces")},
            repair=report.get("repair"))
        for fut in job.waiters:
            fut.set_result(dict(report))

    def stop_verify(self, why: str) -> None:
        """A running verify ends without a report (the link or the state changed); its waiters hear why."""
        job, self.verifying = self.verifying, None
        if job is None:
            return
        log(why)
        self.eventlog.emit("verify-stopped", why=job.why, reason=why)
        for fut in job.waiters:
            fut.set_exception(DmreplError(why, "run `dmrepl verify` again once the resource replicates"))

    # -- stop -----------------------------------------------------------------------

    def teardown(self) -> None:
        """Undo what this daemon made (never a stack another one built)."""
        self.stop_verify("verify stopped: the daemon stops")
        if self.built:
            try:
                self.pri.refuse_while_open()
            except DmreplError:
                log(f"{self.pri.top_path} is still open: its devices are kept; writes reach P "
                    "(and S while the NBD link lives) but no checkpoint is taken")
                return
            for line in self.pri.down(self.devs):
                log(f"removed {line}")
        elif self.devs is not None:
            Primary.detach(list(self.devs.loops))
        self.link.drop(None, lost=False)


def describe(lim: Limits) -> str:
    if lim.ceiling_bytes_s is None:
        return "no limit"
    return (f"{lim.floor_bytes_s / (1 << 20):g}-{lim.ceiling_bytes_s / (1 << 20):g} MiB/s, "
            f"at most {lim.share:.0%} of it while the consumer writes")


def status_reply(d: "PrimaryDaemon", pri: Primary) -> dict:
    """What `dmrepl status NAME` shows: the daemon's state and reason, the state file, the kernel."""
    st = pri.state()
    m = d.machine
    return {"name": d.cfg.name, "resource_id": d.cfg.resource_id, "role": "primary",
            "state": str(m.state), "reason": m.reason, "since": m.since, "pid": os.getpid(),
            "checkpoint": st.checkpoint if st else None, "last_checkpoint": d.last_checkpoint,
            "device": pri.top_path, "nbd": d.link.nbd.path if d.link.nbd else None,
            "nbd_connections": d.link.nbd.connections if d.link.nbd else None,
            "nbd_dead_connections": d.link.dead_sockets, "split_brain": d.link.split_brain,
            "resync": d.resync.status() if d.resync else None, "last_resync": d.last_resync,
            "sync": d.sync.latest if d.sync is not None and m.state == State.SYNCING else None,
            "verify": d.verifying.progress() if d.verifying else None, "last_verify": d.last_verify,
            "verify_interval_s": d.cfg.verify_interval_s, "copy_rate": d.copy_rate.status(),
            "secondary": f"{d.link.peer_cfg.link_host}:{d.link.peer_cfg.link_port}",
            "fencing": d.fencing.status(),
            "checkpoint_interval_s": d.cfg.checkpoint_interval_s, "tunnel": tunnel.status(d.cfg),
            "devices": pri.devices(), **pri.kernel_status(),
            "history": [{"time": t, "event": e, "state": s, "reason": r} for t, e, s, r in m.history]}


def run(cfg: PrimaryConfig, *, assume_clean: bool = False) -> int:
    """The daemon, in the foreground, until SIGTERM/SIGINT or `dmrepl down`; returns the exit status."""
    preload(tunnel=cfg.tunnel is not None)
    why = check_runnable(cfg.fencing)
    if why is not None:
        raise DmreplError(f"{cfg.source}: {why}", "install the command or fix [fencing] in the config")
    notifier = Notifier.from_environment()
    exporter = metrics.Exporter(cfg.metrics, cfg.name, log) if cfg.metrics else None
    host_netns = None
    try:
        if exporter is not None:
            exporter.start()                # in this host's namespace, not the link's
        # Before the NBD netlink socket: its family exists only once nbd is loaded, and nothing
        # loads it on a host that booted without it (the lab's VMs; the test VM modprobes it).
        primary_start.load_modules()
        with Primary.open(cfg) as pri, netlink.NBDNetlink() as nl, netlink.LinkEvents() as events:
            if cfg.netns is not None:
                # [fencing]'s command talks to a cluster manager in this host's namespace.
                host_netns = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
                netns.enter(cfg.netns)
            with tunnel.opened(cfg, log):       # in the link's namespace, before any link socket
                return _serve(cfg, pri, nl, events, assume_clean, notifier, exporter, host_netns)
    finally:
        if exporter is not None:
            exporter.close()
        notifier.close()
        if host_netns is not None:
            os.close(host_netns)


def _serve(cfg: PrimaryConfig, pri: Primary, nl, events, assume_clean: bool, notifier: Notifier,
           exporter: metrics.Exporter | None, host_netns: int | None) -> int:
    d = PrimaryDaemon(cfg, pri, nl, events, notifier, host_netns)
    if exporter is not None:
        exporter.families = lambda: metrics.primary_families(d.submit({"op": "status"}), d.pauses, time.time())

    def on_term(signum, frame):
        d.stopping = True
        with contextlib.suppress(OSError):      # closed: the daemon has ended
            d.wake_w.send(b"x")

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    d.stopping = handover.stop_requested()      # asked between a switchover's two roles
    server = control.ControlServer(control.socket_path(cfg.resource_state_dir), d.submit, log)
    d.eventlog.emit("started", pid=os.getpid())      # the state directory exists now
    responder = None
    try:
        if cfg.hello_listen is not None:
            responder = HelloResponder(*cfg.hello_listen, cfg.key_file, d.link.hello, d.link.saw_split_brain)
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
        if d.machine.state != State.STOPPING:
            d.machine.fire(Event.STOP, "stop requested")     # STATUS= says so
        if d.handover:
            notifier.handing_over(f"switchover: `dmrepl up {cfg.name}` again, in the role the state says")
        else:
            notifier.stopping()
        log("stopping")
        d.teardown()
        d.eventlog.emit("stopped", pid=os.getpid())
        server.drain(timeout=10)            # a switchover's caller hears how it went, failed or not
        return handover.HANDOVER if d.handover else d.exit_status
    finally:
        d.wake_r.close()
        d.wake_w.close()
        d.fencing.close()
        if responder is not None:
            responder.close()
        server.close()
