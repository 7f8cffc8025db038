"""`dmrepl resize NAME` on the primary: the replicated device grows, online, on both hosts.

Both disks must have grown to the same new size first (lvextend, truncate -s on an image).

    1  checks here: a grow (a shrink is refused), the sizes a resync needs, era metadata room
    2  GROW {size} -> the secondary grows its stack (the new range recorded as diverged), or
       refuses: nothing changed
    3  the NBD leg dropped (state degraded, era records the consumer's writes meanwhile), mirror
       and era at the new size: the consumer sees it now
    4  the link again at once: hello at the new size, a resync that compares the writes since the
       last checkpoint and the whole new range (the secondary's diverged ranges), a checkpoint
       joins the hosts

If this host fails at 3 (or loses power before its size is recorded), it stays at the old size,
and its next hello tells the secondary, which goes back to it (secondary_link.py): both hosts at
the old size, the resync of the reconnection makes them equal.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from dmrepl.daemon import peer
from dmrepl.daemon.machine import Event
from dmrepl.daemon.progress import log
from dmrepl.errors import DmreplError
from dmrepl.kernel import blockdev
from dmrepl.link.frames import FrameError
from dmrepl.roles.primary import resync

if TYPE_CHECKING:
    from dmrepl.daemon.primary import PrimaryDaemon

SECTOR = 512


def resize(d: "PrimaryDaemon") -> dict:
    name, cfg = d.cfg.name, d.cfg
    old = blockdev.size_bytes(d.pri.top_path)   # the live table's (a state from before resize records none)
    new = blockdev.size_bytes(cfg.disk)         # an image file's size, or the block device's
    if new == old:
        raise DmreplError(f"{name} is {old} bytes, and so is its disk {cfg.disk}: nothing to grow",
                          "grow the disk on both hosts to the same new size first (lvextend; truncate -s for an "
                          "image file), then resize")
    if new < old:
        raise DmreplError(f"{name} is {old} bytes and its disk {cfg.disk} only {new}: shrinking is not supported",
                          "give the disk its size back")
    block = cfg.era_block_sectors * SECTOR
    piece = resync.region_sectors(new) * SECTOR
    if new % block or new % piece:
        raise DmreplError(f"the new size {new} is not a multiple of the era block ({block} bytes) and of the "
                          f"resync's piece ({piece} bytes)", "round the disks' new size up to that on both hosts")
    era = d.pri.era_status()
    need = -(-(new // block) * 4 // (era.metadata_block_sectors * SECTOR)) + 16   # 4 bytes a block, some slack
    free = era.total_metadata_blocks - era.used_metadata_blocks
    if need > free:
        raise DmreplError(f"the era metadata {cfg.era_metadata} has {free} free blocks; {new} bytes need about {need}",
                          "give it more room: stop, move to a larger era_metadata (a full resync), or grow less")
    d.stop_verify("verify stopped: resize")
    t0 = time.monotonic()
    try:
        theirs = peer.remote_grow(d.link.session, new)      # no gap limit: it answers nothing while it grows
    except peer.PeerRefused as e:
        raise DmreplError(f"resize refused by the secondary: {e}", (e.hint or "") + "; nothing changed") from None
    except (FrameError, OSError) as e:
        d.lost(Event.LINK_ERROR, f"the control link broke during a resize: {e}")
        raise DmreplError(f"resize: the control link broke ({e})", "this host stays at the old size; if the "
                          "secondary grew, it goes back to that size at the reconnect; then resize again") from None
    d.machine.fire(Event.RESIZE, f"resize {old} -> {new} bytes: the NBD leg is dropped while this host grows; "
                                 "a resync of the new range follows")
    d.link.drop(lambda: d.pri.drop_leg(d.devs), lost=False)
    d.link.next_attempt = time.monotonic()      # the loop reconnects at its next turn
    try:
        d.pri.grow(d.devs, new)
    except (DmreplError, OSError) as e:         # KernelError, SwitchError: OSErrors
        raise DmreplError(f"resize failed on this host: {e}", f"{name} stays {old} bytes on both hosts: the secondary "
                          "goes back to that size at the reconnect, now") from None
    report = {"old_bytes": old, "new_bytes": new, "seconds": round(time.monotonic() - t0, 3),
              "secondary_grown_from": theirs.get("grown_from")}
    log(f"resize: {name} is {new} bytes ({old} before); reconnecting: the resync compares the new range")
    d.eventlog.emit("resize", **report)
    return report
