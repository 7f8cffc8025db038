"""Bringing a secondary up and down with its daemon: what the CLI and the demo share.

The policy (dmrepl.secondary) builds and tears down the stack; this module adds
the process that serves it (dmrepl.daemon) and keeps the order right: the
export starts after the stack is up, and is fenced before a failover or down.
"""

from __future__ import annotations

import os
import subprocess
import sys

from dmrepl import poll, private
from dmrepl.config import SecondaryConfig
from dmrepl.daemon import supervisor as daemon
from dmrepl.daemon import tunnel
from dmrepl.daemon.detach import log_since
from dmrepl.daemon.export import port_accepts
from dmrepl.errors import DmreplError
from dmrepl.roles.secondary import Secondary

# A Python start plus nbdkit's: well under a second on a host, tens of seconds on a loaded host
# under emulation (a test VM once took more than 30 s).
DAEMON_START_TIMEOUT = 90.0


def start_daemon(cfg: SecondaryConfig, config_path: str, timeout: float = DAEMON_START_TIMEOUT) -> int:
    """Start the supervisor detached; return its pid once the export accepts connections."""
    pid = daemon.running_pid(cfg)
    if pid is not None:
        return pid
    if port_accepts(cfg.listen_host, cfg.listen_port):
        raise DmreplError(f"listen address {cfg.listen_host}:{cfg.listen_port} is already in use",
                          "stop what listens there, or change 'listen' in the config")
    if cfg.tunnel is not None:
        tunnel.private_key(cfg)         # a missing or readable key: said here, not in the daemon's log
    private.ensure_dir(cfg.resource_state_dir)
    log_path = daemon.log_path(cfg)
    log = private.open_file(log_path, "ab")
    offset = log.tell()
    try:
        proc = subprocess.Popen([sys.executable, "-m", "dmrepl.daemon", "secondary", "--config",
                                 os.path.abspath(config_path)],
                                stdin=subprocess.DEVNULL, stdout=log, stderr=log, cwd="/",
                                start_new_session=True)
    finally:
        log.close()

    def ready():
        if proc.poll() is not None:
            return True
        if daemon.running_pid(cfg) != proc.pid:
            return False
        if cfg.key_file is not None:    # the gate: its pid file (empty until the primary connects)
            return (os.path.exists(daemon.export_pid_path(cfg))
                    and port_accepts(cfg.link_host, cfg.link_port))
        return port_accepts(cfg.listen_host, cfg.listen_port) and daemon.export_pid(cfg) is not None

    came_up = poll.until(ready, timeout=timeout, interval=0.05)
    if proc.poll() is not None:
        raise DmreplError(f"the daemon exited with status {proc.returncode}; its log says:\n"
                          f"{log_since(log_path, offset, 8)}", f"see {log_path}")
    if not came_up:
        proc.terminate()
        proc.wait()
        raise DmreplError(f"the NBD export did not come up within {timeout:.0f} s; the daemon's log says:\n"
                          f"{log_since(log_path, offset, 8)}", f"see {log_path}")
    return proc.pid


def up(sec: Secondary, config_path: str) -> dict:
    state = sec.up()
    try:
        pid = start_daemon(sec.cfg, config_path) if state.role == "secondary" else None
    except BaseException:
        sec.down(force=True)
        raise
    return {"state": state, "daemon_pid": pid}


def down(sec: Secondary, force: bool = False) -> list[str]:
    if sec.active_openers() and not force:
        sec.down(force=False)  # raises the clear error, changes nothing
    daemon.stop(sec.cfg)
    return sec.down(force=force) + tunnel.remove_left(sec.cfg)


def failover(sec: Secondary):
    return sec.failover(fence=lambda: daemon.fence(sec.cfg))
