"""The secondary daemon's pid files and log, read without importing the daemon: the CLI's
`status` and `role` ask whether it runs (a Python start in the test VM pays for every module)."""

from __future__ import annotations

import os

from dmrepl.config import SecondaryConfig

PID_FILE = "daemon.pid"
EXPORT_PID_FILE = "export.pid"
LOG_FILE = "daemon.log"


def pid_path(cfg: SecondaryConfig) -> str:
    return os.path.join(cfg.resource_state_dir, PID_FILE)


def export_pid_path(cfg: SecondaryConfig) -> str:
    return os.path.join(cfg.resource_state_dir, EXPORT_PID_FILE)


def log_path(cfg: SecondaryConfig) -> str:
    return os.path.join(cfg.resource_state_dir, LOG_FILE)


def _pids_from(path: str, marker: bytes) -> list[int]:
    """The pids in `path` (one a line) whose process runs with `marker` in its cmdline."""
    try:
        with open(path) as f:
            lines = f.read().split()
    except OSError:
        return []
    return [pid for pid in (_running(line, marker) for line in lines) if pid is not None]


def _pid_from(path: str, marker: bytes) -> int | None:
    """The pid in `path` if that process runs and its cmdline contains `marker`."""
    pids = _pids_from(path, marker)
    return pids[0] if pids else None


def _stat(pid: int) -> list[str] | None:
    """/proc/PID/stat's fields after the command name (state, ppid, ...); None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _running(text: str, marker: bytes) -> int | None:
    try:
        pid = int(text)
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read()
    except (OSError, ValueError):
        return None
    fields = _stat(pid)
    if not fields or fields[0] == "Z":
        return None  # gone, or exited and not yet reaped
    return pid if marker in cmdline else None


def running_pid(cfg: SecondaryConfig) -> int | None:
    """The daemon's pid if it runs (checked against /proc/PID/cmdline), else None."""
    # `python -m dmrepl.daemon` when `secondary up` detached it, `dmrepl up NAME` in the foreground.
    return _pid_from(pid_path(cfg), b"dmrepl")


def export_pid(cfg: SecondaryConfig) -> int | None:
    return _pid_from(export_pid_path(cfg), b"nbdkit")


def export_pids(cfg: SecondaryConfig) -> list[int]:
    """nbdkit's pid (an open export) or those of the servers the gate admitted, one per connection."""
    return _pids_from(export_pid_path(cfg), b"nbdkit")
