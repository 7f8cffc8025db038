"""Which host a cluster manager should promote: the facts of one host, read as a verdict.

A Pacemaker promotable clone (ocf/dmrepl) runs one instance a host.  Unpromoted, a host serves
as the secondary (its view at the last checkpoint) or, if it holds the primary's role, stands by
with its disk untouched; promoted, it runs the primary.  The verdict says which of these the
host is in and its promotion score, in tiers (Pacemaker promotes the highest):

    10000  the primary runs here (or its stack without its daemon, or a failover's stack)
     5000  this host holds the primary's role and stands by after a clean stop: it has writes its
           secondary's checkpoint lacks, but a primary running on the other host stays
     1000  a secondary serving a consistent checkpoint: a failover takes over there
    (none) a secondary with no checkpoint yet (initial sync), a lost hidden store, writes
           given up and not yet replaced by the primary's (after `resolve`), nothing running, or
           a primary that stopped without `down` (it crashed: the other host may have taken over)

Scores are tiers, not checkpoint numbers: a primary is always ahead of its secondary's last
checkpoint, and two hosts that both hold the primary's role are a split brain that only an
operator resolves (never a score).
"""

from __future__ import annotations

from dataclasses import dataclass

PRIMARY_SCORE = 10000
STANDBY_SCORE = 5000
SECONDARY_SCORE = 1000


@dataclass(frozen=True)
class Facts:
    role: str | None                # the state file's: "primary", "secondary"; None before the first start
    primary_state: str | None       # the primary daemon's state if one answers, else None
    secondary_running: bool         # a secondary daemon serves the export
    stack_left: bool                # devices of the resource exist on this host
    taken_over: bool                # a failover's stack (the secondary's, merged) runs here
    checkpoint: int = 0             # the secondary's view
    checkpoint_lost: bool = False
    diverged: bool = False          # writes given up by `resolve`, not yet replaced
    merging: bool = False           # a failover's merge, not finished (interrupted)
    unclean: bool = False           # the primary's role, stopped without `down` (a crash, a power loss)


@dataclass(frozen=True)
class Verdict:
    run: str                        # promoted | unpromoted | standby | stopped | failed
    score: int | None               # None: this host must not be promoted
    why: str


def assess(f: Facts) -> Verdict:
    if f.primary_state is not None:
        if f.primary_state == "failed":
            return Verdict("failed", PRIMARY_SCORE, "the primary's daemon reports failed")
        if f.primary_state == "unanswered":
            return Verdict("promoted", PRIMARY_SCORE, "the primary's daemon runs but did not answer in time")
        return Verdict("promoted", PRIMARY_SCORE, f"the primary runs ({f.primary_state})")
    if f.merging:
        return Verdict("failed", PRIMARY_SCORE, "a failover's merge was interrupted: `dmrepl failover` "
                       "finishes it")
    if f.taken_over:
        return Verdict("failed", PRIMARY_SCORE, "a failover's stack runs here, not the primary's: "
                       "`dmrepl down`, then `dmrepl up` replicates from here")
    if f.role == "primary":
        if f.stack_left:
            return Verdict("failed", PRIMARY_SCORE, "the primary's stack is up without its daemon "
                           "(`dmrepl up` takes it over)")
        if f.unclean:
            return Verdict("standby", None, "this host was the primary and stopped without `down` (a crash, a "
                           "power loss): the other host may have taken over since, so it is not promoted on its "
                           "own (if it holds the newest data: `dmrepl down`, else `dmrepl resolve`)")
        return Verdict("standby", STANDBY_SCORE, "this host holds the primary's role; nothing runs")
    if f.secondary_running:
        if f.checkpoint_lost:
            return Verdict("unpromoted", None, "the hidden store was lost: no checkpoint to take over at")
        if f.diverged:
            return Verdict("unpromoted", None, "this host gave its writes up and the primary has not "
                           "replaced them yet")
        if f.checkpoint < 1:
            return Verdict("unpromoted", None, "no checkpoint yet (the initial sync has not finished)")
        return Verdict("unpromoted", SECONDARY_SCORE, f"the secondary serves checkpoint {f.checkpoint}")
    if f.stack_left:
        return Verdict("failed", None, "the secondary's stack is up without its daemon")
    return Verdict("stopped", None, "nothing runs")
