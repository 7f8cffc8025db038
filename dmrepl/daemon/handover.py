"""The last step of a planned switchover on each host: this process becomes its new role's daemon.

Both daemons end what they serve (the old primary's stack is gone, the new primary's secondary
stack is down) and return HANDOVER; `dmrepl up` then runs again in the same process: the state
file now says the other role.  systemd (Type=notify: RELOADING=1, then the new role's READY=1),
the test harness and any supervisor keep the same process, and the modules the new role needs
are loaded already (a new interpreter took 4 s more under TCG, most of it importing pyroute2:
docs/benchmarks.md).  The process first leaves the config's network namespace: a primary opens
the kernel's nbd netlink family, which the initial namespace alone has.
"""

from __future__ import annotations

import signal

from dmrepl.kernel import netns

HANDOVER = 75       # what a daemon's run returns when `dmrepl up` is to run again in its process

_stop = False       # SIGTERM/SIGINT between two roles: the next one stops at once


def _note_stop(signum, frame) -> None:
    global _stop
    _stop = True


def again(name: str, log) -> None:
    """Before `dmrepl up NAME` runs again in this process.  A stop asked for from now on, before
    the next role has its own handler, is kept for it (stop_requested)."""
    signal.signal(signal.SIGTERM, _note_stop)
    signal.signal(signal.SIGINT, _note_stop)
    netns.leave()
    log(f"switchover: `dmrepl up {name}` again in this process, in its new role")


def stop_requested() -> bool:
    """Whether a stop came between two roles (a daemon asks once its own handler is in place)."""
    return _stop
