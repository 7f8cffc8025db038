"""The last step of a planned switchover on each host: this process becomes its new role's daemon.

Both daemons end what they serve (the old primary's stack is gone, the new primary's secondary
stack is down), then run `dmrepl up NAME` again in the same process (execv): the state file
now says the other role, and systemd (Type=notify, same main pid), the test harness and any
supervisor keep the same process.  It leaves the config's network namespace first: a primary
opens the kernel's nbd netlink family, which the initial namespace alone has.
"""

from __future__ import annotations

import os
import sys
from typing import NoReturn

import dmrepl
from dmrepl.daemon import notify
from dmrepl.kernel import netns

HANDOVER = 75       # what a daemon's run returns when `dmrepl up` is to run again in its process


def argv(name: str, config: str) -> list[str]:
    """`dmrepl up NAME --config PATH` as this interpreter runs it (never --assume-clean: a resync
    decides what the disks hold after a role change)."""
    return [sys.executable, "-m", "dmrepl.cli", "up", name, "--config", os.path.abspath(config)]


def reexec(name: str, config: str, log) -> NoReturn:
    netns.leave()
    env = {**os.environ, **notify.reexec_environment()}
    here = os.path.dirname(os.path.dirname(os.path.abspath(dmrepl.__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (here, env.get("PYTHONPATH")) if p)
    log(f"switchover: this process runs `dmrepl up {name}` again, in its new role (pid {os.getpid()})")
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, argv(name, config), env)
