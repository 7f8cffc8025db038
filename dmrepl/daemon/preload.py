"""A daemon imports at its start what its code would otherwise import later.

A package upgrade replaces dmrepl's files under a running daemon (debian/dmrepl.prerm: an upgrade
neither stops nor restarts it).  A module first imported after that would come from the new
version and run beside the old ones already loaded; so the few imports that are deferred for the
CLI's sake (a `dmrepl` command does not pay for what only a daemon needs) are made here, once,
when the daemon starts.  tests/unit/test_package_files.py checks that every deferred import in
the daemon's layers is listed here.
"""

from __future__ import annotations

import importlib

# module -> why the code imports it late
DEFERRED = {
    "pyudev": "kernel/udev.py: waiting for a /dev link (no udev context unless needed)",
}
# the same, for a daemon whose link runs inside WireGuard (pyroute2's family costs 3.5 s of a start
# in the test VM: a daemon without a tunnel does not pay it)
DEFERRED_WITH_TUNNEL = {
    "pyroute2.netns": "daemon/tunnel.py: the tunnel's network namespace",
    "dmrepl.kernel.wireguard": "daemon/tunnel.py: the WireGuard tunnel",
}


def preload(tunnel: bool) -> None:
    for module in (*DEFERRED, *(DEFERRED_WITH_TUNNEL if tunnel else ())):
        importlib.import_module(module)
