"""The primary daemon's start: connect, sync or resync, or come up degraded; or take over the
stack a daemon that died left behind (the consumer may still be using it).

    first start:    hello -> initial sync (or --assume-clean) -> mirror + era -> checkpoint 1
    restart:        hello -> mirror + era -> delta resync from the newest common checkpoint
    no secondary:   era over P alone, degraded; the loop reconnects later
    a stack is up:  no other daemon answers its control socket (ControlServer checked): it is
                    taken as it is, its NBD device disconnected and the leg dropped -> degraded
and `dmrepl down` without a daemon: what the dead one left, its NBD device included.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from dmrepl.daemon import peer, tunnel
from dmrepl.daemon.machine import Event
from dmrepl.daemon.primary_link import disconnect_left
from dmrepl.daemon.primary_resync import initial_sync
from dmrepl.daemon.progress import Progress, log
from dmrepl.errors import DmreplError
from dmrepl.kernel import modules
from dmrepl.link.frames import FrameError
from dmrepl.nbd import netlink
from dmrepl.nbd.attach import AttachError
from dmrepl.roles.primary.rate import Pacer

if TYPE_CHECKING:
    from dmrepl.daemon.primary import PrimaryDaemon
    from dmrepl.roles.primary import Primary


def start(d: "PrimaryDaemon", assume_clean: bool) -> None:
    """Bring the stack up with the secondary (sync, resync or --assume-clean), or degraded without it.
    The modules are loaded (run, before anything opens the NBD netlink family)."""
    if d.pri.is_up():
        return adopt(d)     # no other daemon answers (the control socket said so)
    st = d.pri.check()
    try:
        theirs = d.link.connect()
    except (DmreplError, AttachError, FrameError, OSError) as e:
        if st is not None and st.handover:
            raise DmreplError(f"a switchover to {st.handover['to']} at checkpoint {st.handover['checkpoint']} was "
                              f"not confirmed, and that host cannot tell now whether it took over ({e})",
                              f"start its daemon; if it took over, here `dmrepl resolve {d.cfg.name} "
                              f"--discard-my-data` (nothing was written after that checkpoint) and `dmrepl up "
                              f"{d.cfg.name}`") from None
        if st is None or isinstance(e, peer.PeerRefused) and d.link.split_brain is None:
            raise
        # A restart without the secondary: the consumer gets its disk now; the secondary a delta later.
        d.devs = d.pri.attach()
        d.pri.up(d.devs, None)
        d.built = True
        d.machine.fire(Event.START_DEGRADED, f"the secondary is not reachable: {e}")
        log(f"DEGRADED: up without the secondary ({e}); writes reach P only (era records them); "
            f"trying again every {d.cfg.reconnect_interval_s:g} s")
        d.notifier.ready(d.status_line())
        return
    if st is not None and st.handover:
        # The other host answered as the secondary: it did not take over.  This host is the primary.
        log(f"the switchover to {st.handover['to']} at checkpoint {st.handover['checkpoint']} did not happen: "
            "that host is still the secondary; going on as the primary")
        d.pri.mark_handover(None)
    d.devs = d.pri.attach()
    if st is None and not assume_clean:
        d.machine.fire(Event.CONNECTED, "first start: S gets a full copy of P")
        d.sync = Progress(lambda: d.stopping, d.notifier, on_step=lambda p: d.eventlog.emit("progress", **p),
                          pacer=Pacer(d.copy_rate, lambda: d.stopping))
        initial_sync(d.devs.disk, d.link.nbd.path, d.link.session, theirs.store_bytes, d.sync)
        event, why = Event.SYNCED, "initial sync verified"
    elif assume_clean:
        event, why = Event.CONNECTED_IN_SYNC, "--assume-clean"
    else:
        event = None
    d.pri.up(d.devs, d.link.nbd.path)
    d.built = True
    log(f"up: {d.pri.top_path} replicates to the secondary")
    d.notifier.ready(d.status_line())        # the consumer's device is there: systemd may go on
    if event is None:
        d.begin_resync(theirs)
        return
    # The first checkpoint makes the secondary's view P as it is now: before it, the view is
    # whatever S held (before the sync, or at the last checkpoint).
    d._checkpoint("start")
    d.machine.fire(event, why)

def adopt(d: "PrimaryDaemon") -> None:
    """A daemon that died left its stack, which the consumer may be using: take it over as it is,
    degraded (its NBD connections have no control link any more), then resync as after any loss."""
    d.devs, index = d.pri.adopt()
    d.built = True
    if index is not None:
        if d.nl.is_connected(index):
            log(f"NBD /dev/nbd{index} of the dead daemon: {disconnect_left(d.cfg, d.nl, index)}")
        d.pri.drop_leg(d.devs)
    d.machine.fire(Event.START_DEGRADED, "took over the stack a dead daemon left")
    log(f"DEGRADED: took over the stack of {d.pri.top_path} that a dead daemon left"
        + (f" (NBD /dev/nbd{index} disconnected, leg dropped)" if index is not None else "")
        + "; a delta resync follows when the secondary answers")
    d.notifier.ready(d.status_line())


def down_without_daemon(pri: "Primary") -> list[str]:
    """`dmrepl down` when no daemon runs (it was killed): the stack and loop devices go, and the
    NBD device its mirror still used is disconnected (nothing else would ever release it)."""
    index = pri.nbd_in_use()
    done = pri.down()
    if index is not None:
        with netlink.NBDNetlink() as nl:
            if nl.is_connected(index):
                log(f"NBD /dev/nbd{index} of the dead daemon: {disconnect_left(pri.cfg, nl, index)}")
                done.append(f"/dev/nbd{index}")
    return done + tunnel.remove_left(pri.cfg)


def load_modules() -> None:
    for module in ("nbd", "dm-mirror", "dm-era"):
        why = modules.load(module)
        if why is not None:
            raise DmreplError(f"kernel module {module} cannot be loaded: {why}", "`dmrepl doctor` checks this host")
    # For disconnect_left after a takeover (sock_diag's SOCK_DESTROY for TCP): loaded now, since its
    # autoload at the first use took 3 s in the test VM, while writes wait.  Without it a
    # takeover's disconnect may wait for the NBD timeout, nothing worse.
    modules.load("tcp_diag")
