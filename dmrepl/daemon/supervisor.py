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
import time

from dmrepl import poll, private
from dmrepl.config import SecondaryConfig, load_secondary
from dmrepl.daemon.export import Export, ExportError
from dmrepl.daemon.secondary_link import LinkServer
from dmrepl.errors import DmreplError
from dmrepl.roles.secondary import Secondary

PID_FILE = "daemon.pid"
EXPORT_PID_FILE = "export.pid"
LOG_FILE = "daemon.log"
WATCH_INTERVAL = 1.0
MAX_RESTARTS_PER_MINUTE = 10


def pid_path(cfg: SecondaryConfig) -> str:
    return os.path.join(cfg.resource_state_dir, PID_FILE)


def export_pid_path(cfg: SecondaryConfig) -> str:
    return os.path.join(cfg.resource_state_dir, EXPORT_PID_FILE)


def _remove_pid_files(cfg: SecondaryConfig) -> None:
    for path in (pid_path(cfg), export_pid_path(cfg)):
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def log_path(cfg: SecondaryConfig) -> str:
    return os.path.join(cfg.resource_state_dir, LOG_FILE)


def _pid_from(path: str, marker: bytes) -> int | None:
    """The pid in `path` if that process runs and its cmdline contains `marker`."""
    try:
        with open(path) as f:
            pid = int(f.read().strip())
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read()
        with open(f"/proc/{pid}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                return None  # exited, not yet reaped
    except (OSError, ValueError, IndexError):
        return None
    return pid if marker in cmdline else None


def running_pid(cfg: SecondaryConfig) -> int | None:
    """The daemon's pid if it runs (checked against /proc/PID/cmdline), else None."""
    # `python -m dmrepl.daemon` when `secondary up` detached it, `dmrepl up NAME` in the foreground.
    return _pid_from(pid_path(cfg), b"dmrepl")


def export_pid(cfg: SecondaryConfig) -> int | None:
    return _pid_from(export_pid_path(cfg), b"nbdkit")


def _wait_gone(pid_of, pid: int, timeout: float) -> bool:
    return poll.until(lambda: pid_of() != pid, timeout=timeout)


def stop(cfg: SecondaryConfig, timeout: float = 10.0) -> bool:
    """SIGTERM the daemon and wait until it is gone (it stops nbdkit first). True if one ran."""
    pid = running_pid(cfg)
    if pid is None:
        return fence(cfg)
    os.kill(pid, signal.SIGTERM)
    if not _wait_gone(lambda: running_pid(cfg), pid, timeout):
        os.kill(pid, signal.SIGKILL)
    fence(cfg)
    return True


def fence(cfg: SecondaryConfig, timeout: float = poll.DEFAULT_TIMEOUT) -> bool:
    """Cut the primary off now: SIGKILL the daemon (so it restarts nothing), then nbdkit.

    nbdkit answers SIGTERM by waiting for its clients to disconnect, and a
    primary stays connected: a fence cannot wait for it.  Writes nbdkit had
    acknowledged are on the origin; the failover's suspend flushes them.
    Returns once both are gone (a SIGKILLed process exits asynchronously);
    raises DmreplError if one outlives `timeout`: a fence that cannot be
    confirmed must not let a failover go on.
    """
    killed = False
    for what, pid_of in (("daemon", lambda: running_pid(cfg)), ("nbdkit", lambda: export_pid(cfg))):
        pid = pid_of()
        if pid is None:
            continue
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            continue
        if not _wait_gone(pid_of, pid, timeout):
            raise DmreplError(f"the {what} (pid {pid}) did not exit within {timeout:.0f} s of SIGKILL",
                              "it is stuck in the kernel (D state?): check `cat /proc/%d/stack`" % pid)
        killed = True
    _remove_pid_files(cfg)
    return killed


def _log(msg: str) -> None:
    print(time.strftime("%Y-%m-%d %H:%M:%S ") + msg, file=sys.stderr, flush=True)


def run_secondary(cfg: SecondaryConfig) -> int:
    stopping = False

    def on_term(signum, frame):
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    with private.open_file(pid_path(cfg) + ".tmp", "w") as f:
        f.write(f"{os.getpid()}\n")
    os.replace(pid_path(cfg) + ".tmp", pid_path(cfg))
    with Secondary.open(cfg) as sec:
        device = sec.origin_device()
        # nbdkit writes to our stderr, the daemon log: a start failure's reason is kept there.
        export = Export(device, cfg.listen_host, cfg.listen_port, cfg.resource_id)
        try:
            _start_export(cfg, export)
        except ExportError as e:
            _log(f"the NBD export could not start: {e}")
            _remove_pid_files(cfg)
            return 1
        _log(f"export of {device} listening on {cfg.listen_host}:{cfg.listen_port} (nbdkit pid {export.proc.pid})")
        link = None
        try:
            if cfg.key_file is not None:
                link = LinkServer(cfg, lambda: stopping)
                link.start()
                _log(f"control link listening on {cfg.link_host}:{cfg.link_port}")
            return _supervise(cfg, sec, export, lambda: stopping, link)
        except (OSError, DmreplError) as e:
            _log(f"the control link could not start: {e}")
            return 1
        finally:
            if link is not None:
                link.close()
            export.stop(timeout=2.0)
            _remove_pid_files(cfg)
            _log("stopped")


def _start_export(cfg: SecondaryConfig, export: Export) -> None:
    export.start()
    with private.open_file(export_pid_path(cfg), "w") as f:
        f.write(f"{export.proc.pid}\n")


def _supervise(cfg: SecondaryConfig, sec: Secondary, export: Export, stopping, link: LinkServer | None) -> int:
    """Restart nbdkit when it dies, watch the hidden store; until told to stop."""
    restarts: list[float] = []
    warned: set[str] = set()
    while not stopping():
        if not export.alive():
            _log(f"nbdkit exited with status {export.proc.returncode}: restarting it")
            now = time.monotonic()
            restarts = [t for t in restarts if now - t < 60] + [now]
            if len(restarts) > MAX_RESTARTS_PER_MINUTE:
                _log("nbdkit keeps dying: giving up (the primary will see the secondary as lost)")
                return 1
            try:
                _start_export(cfg, export)
                told = link is not None and link.export_restarted(f"nbdkit exited with status {export.proc.returncode}")
                _log(f"nbdkit restarted (pid {export.proc.pid})" + ("; the primary was told" if told else ""))
            except ExportError as e:
                _log(f"restart failed: {e}")
        _state, health = sec.watch_store()
        if health is not None:
            if health.lost and "lost" not in warned:
                _log(f"CHECKPOINT LOST: the kernel invalidated the hidden store ({health.state}); "
                     "a resync is needed")
                warned.add("lost")
            elif health.over_threshold and "fill" not in warned:
                asked = link is not None and link.request_early_checkpoint(f"hidden store {health.fill:.0%} full")
                _log(f"hidden store {health.fill:.0%} full: early checkpoint requested"
                     + (" from the primary" if asked else ""))
                warned.add("fill")
            elif not health.over_threshold and not health.lost:
                warned.clear()
        deadline = time.monotonic() + WATCH_INTERVAL
        while not stopping() and time.monotonic() < deadline and export.alive():
            time.sleep(0.05)
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


