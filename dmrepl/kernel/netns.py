"""Entering a named network namespace (`ip netns add NAME`): the config's `netns`.

The primary enters it after opening its netlink sockets: the kernel's nbd generic
netlink family exists in the initial namespace only (drivers/block/nbd.c registers
it without netnsok; a genl socket in another namespace gets ENOENT for "nbd"), so
the daemon opens its netlink sockets first, then moves, and its TCP sockets to the
secondary -- which the kernel NBD client takes over -- live in `name`
(docs/kernel-notes.md).  The secondary enters it before anything else: its export,
its control link and the nbdkit it starts all live there.
"""

from __future__ import annotations

import contextlib
import os

from pyroute2 import netns

from dmrepl.errors import DmreplError

_home: int | None = None     # the namespace this process started in, once it entered another


def enter(name: str) -> None:
    """Make this process's sockets in network namespace `name` from now on (one thread only:
    call it before starting any)."""
    global _home
    if _home is None:
        _home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        netns.setns(name, flags=0)
    except OSError as e:
        raise DmreplError(f"cannot enter network namespace {name!r}: {e.strerror or e}",
                          "check `ip netns list`, or remove 'netns' from the config") from None


def leave() -> None:
    """Back to the namespace this process started in (before it runs another program: a
    switchover's primary needs the initial namespace's nbd netlink family)."""
    if _home is not None:
        netns.setns(_home, flags=0)


@contextlib.contextmanager
def inside(name: str | None):
    """Sockets the calling thread makes in the block are namespace `name`'s (None: its own); the
    thread is back in its own namespace after it.  A namespace that does not exist is an error,
    never created."""
    if name is None:
        yield
        return
    back = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        try:
            netns.setns(name, flags=0)
        except OSError as e:
            raise DmreplError(f"cannot enter network namespace {name!r}: {e.strerror or e}",
                              "check `ip netns list`, or remove 'netns' from the config") from None
        try:
            yield
        finally:
            netns.setns(back, flags=0)
    finally:
        os.close(back)
