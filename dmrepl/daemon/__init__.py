"""Processes: the secondary's supervisor daemon, its nbdkit export, and bringing both up and down.

    daemon/supervisor.py  the daemon (python -m dmrepl.daemon): keeps nbdkit running, watches the store
    daemon/export.py      one nbdkit process serving the origin device (no control link configured)
    daemon/gate.py        the NBD gate: one nbdkit per admitted connection of the authenticated primary
    daemon/service.py     up / down / failover with the daemon, in the right order (CLI and demo share it)

It sits above the policy (dmrepl.roles) and below the CLI.
"""

from dmrepl.daemon.supervisor import (
    export_pid,
    export_pid_path,
    export_pids,
    fence,
    log_path,
    running_pid,
    stop,
)

__all__ = ["export_pid", "export_pid_path", "export_pids", "fence", "log_path", "running_pid", "stop"]
