"""The secondary's supervisor: keeps the NBD export running and watches the hidden store.

    python -m dmrepl.daemon secondary --config PATH

Started detached by `dmrepl secondary up`, stopped (SIGTERM) by `down` and by
`failover` (the fence).  It restarts nbdkit if it dies while replication runs,
records in the state file when the store's fill level asks for an early
checkpoint, and says loudly when the kernel invalidated the store.  It logs to
STATE_DIR/NAME/daemon.log; its pid is in STATE_DIR/NAME/daemon.pid.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time

from dmrepl import poll, private
from dmrepl.config import SecondaryConfig, load_secondary
from dmrepl.daemon import handover, metrics, tunnel
from dmrepl.daemon.events import EventLog
from dmrepl.daemon.export import Export, ExportError
from dmrepl.daemon.gate import Admission, NbdGate
from dmrepl.daemon.notify import Notifier
from dmrepl.daemon.pids import (  # noqa: F401 (service, the CLI and tests name them here)
    _running,
    _stat,
    export_pid,
    export_pid_path,
    export_pids,
    log_path,
    pid_path,
    running_pid,
)
from dmrepl.daemon.preload import preload
from dmrepl.daemon.secondary_link import LinkServer, read_peer
from dmrepl.errors import DmreplError
from dmrepl.roles.secondary import Secondary

WATCH_INTERVAL = 1.0
MAX_RESTARTS_PER_MINUTE = 10


def _remove_pid_files(cfg: SecondaryConfig) -> None:
    for path in (pid_path(cfg), export_pid_path(cfg)):
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def stop(cfg: SecondaryConfig, timeout: float = 10.0) -> bool:
    """SIGTERM the daemon and wait until it is gone (it stops nbdkit first). True if one ran."""
    pid = running_pid(cfg)
    if pid is None:
        return fence(cfg)
    os.kill(pid, signal.SIGTERM)
    # Its pid file goes first, then the process: `down` returns once the process has exited too
    # (one was seen alive after a `down`, finishing its interpreter's exit).
    if not poll.until(lambda: running_pid(cfg) != pid and exited(pid), timeout=timeout):
        os.kill(pid, signal.SIGKILL)
        poll.until(lambda: exited(pid), timeout=timeout)
    fence(cfg)
    return True


def exited(pid: int) -> bool:
    """Gone, or a zombie (it holds no file open any more)."""
    fields = _stat(pid)
    return not fields or fields[0] == "Z"


def _children(pid: int) -> list[int]:
    return [int(e) for e in os.listdir("/proc")
            if e.isdigit() and (fields := _stat(int(e))) and fields[1] == str(pid)]


def fence(cfg: SecondaryConfig, timeout: float = poll.DEFAULT_TIMEOUT) -> bool:
    """Cut the primary off now: stop the daemon (so it starts no server), SIGKILL every nbdkit
    it runs, then the daemon.

    The servers are the pid file's and the daemon's children: the gate writes a server's pid
    only after starting it, so a fence that trusted the file alone could miss one started just
    before.  nbdkit answers SIGTERM by waiting for its clients to disconnect, and a primary
    stays connected: a fence cannot wait for it.  Writes nbdkit had acknowledged are on the
    origin; the failover's suspend flushes them.  Returns once all are gone (exited: a zombie
    holds no file open); raises DmreplError if one outlives `timeout`: a fence that cannot be
    confirmed must not let a failover go on.
    """
    daemon = running_pid(cfg)
    if daemon is not None:
        os.kill(daemon, signal.SIGSTOP)
    servers = sorted(set(export_pids(cfg)) | set(_children(daemon) if daemon is not None else []))
    victims = [("nbdkit", p) for p in servers] + ([("daemon", daemon)] if daemon is not None else [])
    killed = []
    for what, pid in victims:
        try:
            os.kill(pid, signal.SIGKILL)
            killed.append((what, pid))
        except ProcessLookupError:
            continue
    for what, pid in killed:
        if not poll.until(lambda p=pid: exited(p), timeout=timeout):
            raise DmreplError(f"the {what} (pid {pid}) did not exit within {timeout:.0f} s of SIGKILL",
                              "it is stuck in the kernel (D state?): check `cat /proc/%d/stack`" % pid)
    _remove_pid_files(cfg)
    return bool(killed)


def _log(msg: str) -> None:
    print(time.strftime("%Y-%m-%d %H:%M:%S ") + msg, file=sys.stderr, flush=True)


def run_secondary(cfg: SecondaryConfig) -> int:
    preload(tunnel=cfg.tunnel is not None)
    stopping = False

    def on_term(signum, frame):
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    stopping = handover.stop_requested()        # asked between a switchover's two roles
    notifier = Notifier.from_environment()
    eventlog = EventLog(cfg.resource_state_dir, cfg.name, "secondary")
    pauses = metrics.PauseHistogram()
    exporter = metrics.Exporter(cfg.metrics, cfg.name, _log) if cfg.metrics else None
    _remove_pid_files(cfg)      # a killed daemon's: `up` must not take them for this one's
    with private.open_file(pid_path(cfg) + ".tmp", "w") as f:
        f.write(f"{os.getpid()}\n")
    os.replace(pid_path(cfg) + ".tmp", pid_path(cfg))
    try:
        if exporter is not None:
            exporter.families = lambda: _families(cfg, pauses)
            exporter.start()        # a port in use: a DmreplError for the caller, with its hint
        with tunnel.opened(cfg, _log), Secondary.open(cfg) as sec:
            eventlog.emit("started", pid=os.getpid())

            def on_event(event: str, **fields) -> None:
                if event == "checkpoint":
                    pauses.observe(fields["pause_ms"] / 1000)
                notifier.status(status_line(cfg, sec))
                eventlog.emit(event, **fields)

            if cfg.key_file is None:
                return _run_open_export(cfg, sec, lambda: stopping, notifier, eventlog)
            return _run_gated(cfg, sec, lambda: stopping, notifier, eventlog, on_event)
    except tunnel.TunnelError as e:
        _log(f"WireGuard tunnel: {e}" + (f" ({e.hint})" if e.hint else ""))
        _remove_pid_files(cfg)
        return 1
    except DmreplError:
        _remove_pid_files(cfg)
        raise
    finally:
        if exporter is not None:
            exporter.close()
        eventlog.emit("stopped", pid=os.getpid())
        notifier.close()


def become_primary(cfg: SecondaryConfig) -> None:
    """After a switchover took over here (run_secondary returned HANDOVER): the secondary's stack
    down; `dmrepl up` then runs again in this process, as the primary (handover.py)."""
    with Secondary.open(cfg) as sec:
        for line in sec.down():
            _log(f"switchover: removed {line}")
    handover.again(cfg.name, _log)


def _families(cfg: SecondaryConfig, pauses: metrics.PauseHistogram) -> list:
    """The secondary's metrics, read on the scraping thread with a device-mapper handle of its own."""
    with Secondary.open(cfg) as sec:
        status = sec.status()
    return metrics.secondary_families(cfg.name, status, read_peer(cfg), pauses, time.time())


def status_line(cfg: SecondaryConfig, sec: Secondary) -> str:
    """systemd's STATUS=: role, checkpoint, the primary as the link last saw it."""
    st, peer = sec.state(), read_peer(cfg)
    where = (f"primary {peer['primary']} ({peer['peer']})" if peer and cfg.key_file
             else "no control link" if not cfg.key_file else "no primary yet")
    return f"secondary, checkpoint {st.checkpoint if st else '-'}, {where}"


def _run_gated(cfg: SecondaryConfig, sec: Secondary, stopping, notifier: Notifier, eventlog: EventLog,
               on_event) -> int:
    """The control link and the NBD gate: the primary that proved the key connects from the
    address it proved it from, with the export name of that session (gate.py)."""
    admission = Admission()
    gate = NbdGate(cfg.listen_host, cfg.listen_port, sec.origin_device(), admission, _log,
                   on_change=lambda pids: _write_export_pids(cfg, pids))
    link = None
    try:
        gate.start()
        _write_export_pids(cfg, [])      # `up` waits for this file: the gate listens
        _log(f"NBD gate listening on {cfg.listen_host}:{cfg.listen_port}: only the authenticated primary's "
             "address, with its session's export name")
        link = LinkServer(cfg, lambda: stopping() or link.switched_over, admission, on_event, fence=gate.drop_all)
        link.start()
        _log(f"control link listening on {cfg.link_host}:{cfg.link_port}")
        notifier.ready(status_line(cfg, sec))

        def tend() -> bool:
            for s in gate.ended():
                if s.proc.returncode == 0:      # its client closed the connection
                    _log(f"NBD connection from {s.source} closed")
                    continue
                told = link.export_restarted(f"nbdkit serving {s.source} exited with status {s.proc.returncode}")
                _log(f"nbdkit serving {s.source} exited with status {s.proc.returncode}"
                     + ("; the primary was told" if told else ""))
            return True

        status = _supervise(sec, tend, lambda: stopping() or link.switched_over, link, eventlog)
        return handover.HANDOVER if link.switched_over else status
    except (OSError, DmreplError, ExportError) as e:
        _log(f"the NBD gate or the control link could not start: {e}")
        return 1
    finally:
        if link is not None and link.switched_over:
            notifier.handing_over(f"switchover: {cfg.name} becomes the primary")
        else:
            notifier.stopping()
        if link is not None:
            link.close()
        gate.close()
        _remove_pid_files(cfg)
        _log("stopped")


def _run_open_export(cfg: SecondaryConfig, sec: Secondary, stopping, notifier: Notifier,
                     eventlog: EventLog) -> int:
    """No control link configured: one nbdkit serves anyone who reaches the port and names the
    resource id (the secondary-only setups of the first issues), restarted when it dies."""
    device = sec.origin_device()
    # nbdkit writes to our stderr, the daemon log: a start failure's reason is kept there.
    export = Export(device, cfg.listen_host, cfg.listen_port, cfg.resource_id)
    try:
        _start_export(cfg, export)
    except ExportError as e:
        _log(f"the NBD export could not start: {e}")
        _remove_pid_files(cfg)
        return 1
    _log(f"export of {device} listening on {cfg.listen_host}:{cfg.listen_port} (nbdkit pid {export.proc.pid}); "
         "WARNING: open to any host that reaches it (configure link_listen and key_file for the gate)")
    notifier.ready(status_line(cfg, sec))
    restarts: list[float] = []

    def tend() -> bool:
        nonlocal restarts
        if export.alive():
            return True
        _log(f"nbdkit exited with status {export.proc.returncode}: restarting it")
        now = time.monotonic()
        restarts = [t for t in restarts if now - t < 60] + [now]
        if len(restarts) > MAX_RESTARTS_PER_MINUTE:
            _log("nbdkit keeps dying: giving up")
            return False
        try:
            _start_export(cfg, export)
            _log(f"nbdkit restarted (pid {export.proc.pid})")
        except ExportError as e:
            _log(f"restart failed: {e}")
        return True

    try:
        return _supervise(sec, tend, stopping, None, eventlog)
    finally:
        notifier.stopping()
        export.stop(timeout=2.0)
        _remove_pid_files(cfg)
        _log("stopped")


_pid_file_lock = threading.Lock()      # the gate's accept thread and the main loop both write it


def _write_export_pids(cfg: SecondaryConfig, pids: list[int]) -> None:
    with _pid_file_lock:
        tmp = export_pid_path(cfg) + ".tmp"
        with private.open_file(tmp, "w") as f:
            f.write("".join(f"{pid}\n" for pid in pids))
        os.replace(tmp, export_pid_path(cfg))


def _start_export(cfg: SecondaryConfig, export: Export) -> None:
    export.start()
    _write_export_pids(cfg, [export.proc.pid])


def _supervise(sec: Secondary, tend, stopping, link: LinkServer | None, eventlog: EventLog) -> int:
    """Tend the export every 50 ms (`tend()`: False gives up: a dead server is noticed at once),
    watch the hidden store every WATCH_INTERVAL; until told to stop."""
    warned: set[str] = set()
    while not stopping():
        deadline = time.monotonic() + WATCH_INTERVAL
        while not stopping() and time.monotonic() < deadline:
            if not tend():
                return 1
            time.sleep(0.05)
        _state, health = sec.watch_store()
        if health is not None:
            if health.lost and "lost" not in warned:
                _log(f"CHECKPOINT LOST: the kernel invalidated the hidden store ({health.state}); "
                     "a resync is needed")
                eventlog.emit("checkpoint-lost", store_state=health.state)
                warned.add("lost")
            elif health.over_threshold and "fill" not in warned:
                asked = link is not None and link.request_early_checkpoint(f"hidden store {health.fill:.0%} full")
                _log(f"hidden store {health.fill:.0%} full: early checkpoint requested"
                     + (" from the primary" if asked else ""))
                eventlog.emit("store-fill", fill=round(health.fill, 4), early_checkpoint_asked=asked)
                warned.add("fill")
            elif not health.over_threshold and not health.lost:
                warned.clear()
    return 0


def configure_logging() -> None:
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(asctime)s %(message)s",
                        datefmt="%Y-%m-%d %H:%M:%S")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dmrepl.daemon")
    p.add_argument("role", choices=["secondary"])
    p.add_argument("--config", required=True)
    args = p.parse_args(argv)
    configure_logging()
    cfg = load_secondary(path=args.config)
    return run_secondary(cfg)


