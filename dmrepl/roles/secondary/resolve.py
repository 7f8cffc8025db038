"""`dmrepl resolve NAME --discard-my-data`: this host gives up the writes it made as primary.

Used on the old primary after its secondary took over (the failback), and on
either host of a split brain (both wrote after their last shared checkpoint):
the host becomes a secondary of the other one.  Nothing is overwritten here:
the state records *what* this host wrote of its own since that checkpoint --
its era's blocks written since (read offline: the stack is down) and the
ranges a failover left (`diverged`) -- and the new primary's delta resync
compares those ranges too, so that every one of them gets the primary's data.
Until that resync and the checkpoint after it, this host's standby view is
its own disk as it was left: not a checkpoint.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator

from dmrepl.config import SecondaryConfig
from dmrepl.errors import DmreplError
from dmrepl.kernel import blockdev, dm, era, loop
from dmrepl.names import SECONDARY_PARTS, StackNames
from dmrepl.ranges import merge
from dmrepl.roles.secondary.stack import Stack
from dmrepl.roles.transitions import Role
from dmrepl.state import ResourceState, StateStore

SECTOR = 512


def _base_era(st: ResourceState) -> int | None:
    """The era from which this host's writes are its own: the takeover's, or its last checkpoint's."""
    took_over = (st.diverged or {}).get("era")
    if took_over is not None:
        return took_over
    return st.era_of(st.checkpoint)


def _merge(ranges: list[tuple[int, int]]) -> list[list[int]]:
    """(offset, length) byte ranges merged, as the state file keeps them."""
    return [[b, e - b] for b, e in merge((off, off + n) for off, n in ranges)]


def discard_my_data(cfg: SecondaryConfig, ctl: dm.Control) -> ResourceState:
    """Make this host the secondary of its peer, recording what it wrote of its own."""
    states = StateStore(cfg.resource_state_dir)
    if cfg.era_metadata is None:
        raise DmreplError(f"{cfg.source} has no [primary] section: resolve needs both roles' sections "
                          "(the era metadata tells what this host wrote)", "add [primary] and start_as")
    names = StackNames(cfg.name)
    up = [n for n in [names.top(), names.dm("mirror")] + [names.dm(p) for p in SECONDARY_PARTS] if ctl.exists(n)]
    if up:
        raise DmreplError(f"resource {cfg.name} is up on this host ({', '.join(up)})",
                          f"stop the consumer and run `dmrepl down {cfg.name}` first: its writes are given up")
    with states.locked():
        st = states.load()
        if st is None:
            raise DmreplError(f"resource {cfg.name} never ran on this host: nothing to resolve")
        if st.role != Role.PRIMARY:
            raise DmreplError(f"resource {cfg.name} is {st.role} on this host: nothing to give up",
                              "resolve runs on a host that was (or took over as) primary")
        size = st.size_bytes or blockdev.size_bytes(cfg.disk)
        ranges = [(int(o), int(n)) for o, n in (st.diverged or {}).get("ranges") or []]
        since = _base_era(st)
        if since is None:
            ranges = [(0, size)]       # no era history to tell: the whole disk is compared
        else:
            block = cfg.era_block_sectors * SECTOR
            for b, e in _written(cfg, ctl, names, since):
                ranges.append((b * block, min(e * block, size) - b * block))
        stack = Stack(cfg, ctl)
        for store in cfg.hidden_stores:
            with _device(store) as dev:
                stack.zero_header(dev)      # the secondary starts with empty stores
        diverged = {"checkpoint": st.checkpoint, "ranges": _merge(ranges)}
        new = st.evolve(role=Role.SECONDARY.value, current_store=0, checkpoint_lost=False, handover=None,
                        early_checkpoint_requested=False, diverged=diverged,
                        history=[*st.history, {"event": "resolve --discard-my-data", "checkpoint": st.checkpoint,
                                               "diverged_bytes": sum(n for _o, n in diverged["ranges"])}])
        states.save(new)
    return new


def _written(cfg: SecondaryConfig, ctl: dm.Control, names: StackNames, since: int) -> list[tuple[int, int]]:
    """Era blocks written since `since`, the era a crash may have left current included (settle)."""
    with _device(cfg.era_metadata) as meta, _device(cfg.disk) as disk:
        era.settle(ctl, names.dm("era-settle"), names.uuid("era-settle"), meta, disk, cfg.era_block_sectors)
        return era.written_since_offline(meta, since)


@contextmanager
def _device(path: str) -> Iterator[str]:
    """The block device of `path` (a loop device over a file while it is used)."""
    if not os.path.isfile(path):
        yield path
        return
    dev = loop.attach(path)
    try:
        yield dev
    finally:
        loop.detach(dev)
