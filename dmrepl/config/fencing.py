"""The [fencing] table: mark the other host outdated while this host's primary writes without it.

    [fencing]
    command = "/usr/lib/dmrepl/crm-fencing"   # run as: COMMAND outdate | COMMAND clear
    timeout_s = 10                # a run that takes longer is killed and counts as failed
    retry_interval_s = 30         # a failed run is tried again this often

A cluster manager that loses the primary's host promotes the secondary, whose view is the last
checkpoint.  While the primary carries on without its secondary (degraded, or resyncing it),
that view lacks every write since: promoting it would lose them.  The primary's daemon runs
`COMMAND outdate` when it goes on alone and `COMMAND clear` after the first checkpoint that joins
the hosts again (daemon/fencing.py); ocf/crm-fencing is the command for Pacemaker.  Off unless
configured.
"""

from __future__ import annotations

import os
import shlex
from dataclasses import dataclass

from dmrepl.config.fields import ConfigError, check_keys, expect, number

KEYS = frozenset({"command", "timeout_s", "retry_interval_s"})


@dataclass(frozen=True)
class Fencing:
    command: tuple[str, ...]        # argv; the action is appended
    timeout_s: float = 10.0
    retry_interval_s: float = 30.0


def parse(doc: dict, source: str) -> Fencing | None:
    table = expect(doc, "fencing", dict, source)
    if table is None:
        return None
    where = f"{source} [fencing]"
    check_keys(table, KEYS, where)
    raw = expect(table, "command", str, where, required=True)
    try:
        argv = tuple(shlex.split(raw))
    except ValueError as e:
        raise ConfigError(f"{where}: 'command' {raw!r} cannot be split into words: {e}") from None
    if not argv or not os.path.isabs(argv[0]):
        raise ConfigError(f"{where}: 'command' must start with an absolute path, e.g. "
                          "\"/usr/lib/dmrepl/crm-fencing\" (it runs as: COMMAND outdate | COMMAND clear)")
    return Fencing(command=argv, timeout_s=number(table, "timeout_s", float, where, 10.0, 0.1, 600.0),
                   retry_interval_s=number(table, "retry_interval_s", float, where, 30.0, 0.1, 86400.0))


def check_runnable(fencing: Fencing | None) -> str | None:
    """Why the command cannot run here (None: it can): checked when a primary starts."""
    if fencing is None:
        return None
    path = fencing.command[0]
    if not os.path.isfile(path):
        return f"[fencing] command {path}: no such file"
    if not os.access(path, os.X_OK):
        return f"[fencing] command {path}: not executable (chmod 0755)"
    return None
