"""Bringing a secondary up and down with its daemon: what the CLI and the demo share.

The policy (dmrepl.secondary) builds and tears down the stack; this module adds
the process that serves it (dmrepl.daemon) and keeps the order right: the
export starts after the stack is up, and is fenced before a failover or down.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

from dmrepl import daemon
from dmrepl.config import SecondaryConfig
from dmrepl.errors import DmreplError
from dmrepl.export import port_accepts
from dmrepl.secondary import Secondary


def _log_tail(path: str, lines: int = 8) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:]).strip()
    except OSError:
        return ""


def start_daemon(cfg: SecondaryConfig, config_path: str, timeout: float = 20.0) -> int:
    """Start the supervisor detached; return its pid once the export accepts connections."""
    pid = daemon.running_pid(cfg)
    if pid is not None:
        return pid
    if port_accepts(cfg.listen_host, cfg.listen_port):
        raise DmreplError(f"listen address {cfg.listen_host}:{cfg.listen_port} is already in use",
                          "stop what listens there, or change 'listen' in the config")
    os.makedirs(cfg.resource_state_dir, mode=0o700, exist_ok=True)
    log = open(daemon.log_path(cfg), "ab")
    try:
        proc = subprocess.Popen([sys.executable, "-m", "dmrepl.daemon", "secondary", "--config",
                                 os.path.abspath(config_path)],
                                stdin=subprocess.DEVNULL, stdout=log, stderr=log, cwd="/",
                                start_new_session=True)
    finally:
        log.close()
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise DmreplError(f"the daemon exited with status {proc.returncode}: "
                              f"{_log_tail(daemon.log_path(cfg))}", f"see {daemon.log_path(cfg)}")
        if (port_accepts(cfg.listen_host, cfg.listen_port) and daemon.running_pid(cfg) == proc.pid
                and daemon.export_pid(cfg) is not None):
            return proc.pid
        if time.monotonic() > deadline:
            proc.terminate()
            proc.wait()
            raise DmreplError("the NBD export did not come up in time", f"see {daemon.log_path(cfg)}")
        time.sleep(0.05)


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
    return sec.down(force=force)


def failover(sec: Secondary):
    return sec.failover(fence=lambda: daemon.fence(sec.cfg))
