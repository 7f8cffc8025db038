"""`dmrepl switchover NAME` on the primary: the primary's role moves to the secondary, no write
lost, nothing to resync.

    this host (A, primary)                          its secondary (B)
    consumer closed? (else refused)
    checkpoint n (both hosts)
    SWITCHOVER {n}                          ->      ready? (both roles' sections, standby of n,
                                            <-      its own consumer closed)  READY | refused
    stack removed (refused if a consumer
    opened it meanwhile), NBD disconnected
    SWITCHOVER_GO {n}                       ->      fence, failover at n (an empty store: nothing
                                            <-      rolled back, merged at once)  DONE
    resolve: the secondary of B at n                B: its stack down, `dmrepl up` again: the
    `dmrepl up` again in this process:              primary; hello to A, a resync of nothing,
    A's secondary serves                            checkpoint n+1 joins the hosts

Until A's stack is removed, any refusal changes nothing: A goes on replicating.  After it, if
B does not say DONE (the link broke, its failover failed), A cannot know whether B took over:
it keeps no device for a consumer and its daemon ends with the role primary at n, saying what
to check (never both hosts primary with writes).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from dmrepl.config import SecondaryConfig, load
from dmrepl.daemon import peer
from dmrepl.daemon.machine import Event
from dmrepl.daemon.progress import log
from dmrepl.errors import DmreplError
from dmrepl.kernel import dm
from dmrepl.link.frames import FrameError
from dmrepl.roles.secondary.resolve import discard_my_data

if TYPE_CHECKING:
    from dmrepl.daemon.primary import PrimaryDaemon


def secondary_config(d: "PrimaryDaemon") -> SecondaryConfig:
    """This host's config as the secondary it becomes; refused without a [secondary] section."""
    cfg = d.cfg
    sec = load(cfg.name, cfg.source, role="secondary") if cfg.source != "<built>" else None
    if not isinstance(sec, SecondaryConfig) or sec.era_metadata is None:
        raise DmreplError(f"{cfg.source} has no [secondary] section: this host could not follow the new primary",
                          "add [secondary] (hidden stores, listen, link_listen) and start_as to its config")
    return sec


def switchover(d: "PrimaryDaemon") -> dict:
    """The whole switchover on this host's side (the daemon's loop thread); its report."""
    name = d.cfg.name
    sec_cfg = secondary_config(d)
    try:
        d.pri.refuse_while_open()
    except DmreplError as e:
        raise DmreplError(f"switchover refused: {e}", "stop the consumer first: its writes move to the other "
                          "host, which takes over at the last checkpoint; nothing changed") from None
    d.stop_verify("verify stopped: switchover")
    t0 = time.monotonic()
    n = d._checkpoint("switchover")["checkpoint"]
    session, silence = d.link.session, d.link.silence_s
    to = str(session.peer)
    try:
        peer.switchover_ready(session, n, silence)
    except peer.PeerRefused as e:
        raise DmreplError(f"switchover refused by the secondary: {e}",
                          (e.hint or "") + "; nothing changed: this host replicates on") from None
    except (FrameError, OSError) as e:
        d.lost(Event.LINK_ERROR, f"the control link broke during a switchover: {e}")
        raise DmreplError(f"switchover: the control link broke ({e})", "nothing changed; this host is degraded "
                          "and reconnects, then try again") from None
    try:
        removed = d.pri.down(d.devs)        # the top first: refused (EBUSY) if a consumer opened it meanwhile
    except DmreplError as e:
        raise DmreplError(f"switchover stopped: {e}", "a consumer opened the device during the switchover; "
                          "nothing changed: this host replicates on") from None
    d.built, d.devs = False, None
    d.machine.fire(Event.SWITCHOVER, f"switchover to {to} at checkpoint {n}")
    for line in removed:
        log(f"switchover: removed {line}")
    d.link.disconnect()
    stopped = time.monotonic()
    d.stopping = True
    # Until the answer: if this process dies (power, kill), its next start must not be a primary
    # beside the one the other host may have become (primary_start.start refuses then).
    d.pri.mark_handover({"checkpoint": n, "to": to, "time": time.time()})
    try:
        # No gap limit: the secondary answers no heartbeat while it fails over (SWITCHOVER_TIMEOUT bounds it).
        done = peer.switchover_go(session, n)
    except peer.PeerRefused as e:
        if not e.unchanged:
            return _in_doubt(d, n, e)
        d.pri.mark_handover(None)
        d.handover = True           # `dmrepl up` again in this process: the state still says primary
        log(f"switchover: the secondary refused to take over at checkpoint {n} ({e}); nothing changed there: "
            "this host starts again as the primary")
        raise DmreplError(f"switchover refused by the secondary at its last step: {e}",
                          "nothing changed there; this host's daemon starts again as the primary in the same "
                          "process (a resync of nothing, then replicating)") from None
    except (DmreplError, FrameError, OSError) as e:
        return _in_doubt(d, n, e)

    try:
        with dm.Control() as ctl:
            st = discard_my_data(sec_cfg, ctl)
    except DmreplError as e:
        d.exit_status = 1
        raise DmreplError(f"switchover: {to} took over at checkpoint {n}, but this host could not become its "
                          f"secondary: {e}", f"fix that, then `dmrepl resolve {name} --discard-my-data` (nothing "
                          f"written here since checkpoint {n}) and `dmrepl up {name}`") from None
    d.handover = True
    report = {"checkpoint": n, "new_primary": to, "rolled_back_bytes": done.get("rolled_back_bytes", 0),
              # What B's first resync compares: era blocks of the last checkpoint's era, a superset of
              # nothing (the era recorded for n is the one current at its suspend: Primary.checkpoint).
              "recheck_bytes": sum(length for _o, length in st.diverged["ranges"]),
              "seconds": round(time.monotonic() - t0, 3), "stack_down_s": round(stopped - t0, 3)}
    log(f"switchover: {to} took over at checkpoint {n} in {report['seconds']:.2f} s; this host follows it "
        "as its secondary")
    d.eventlog.emit("switchover", **report)
    return report


def _in_doubt(d: "PrimaryDaemon", n: int, e: Exception) -> dict:
    """No DONE: the secondary may or may not have taken over.  This host keeps no device for a
    consumer; its daemon ends (status 1) with the role primary at n."""
    name = d.cfg.name
    d.exit_status = 1
    log(f"SWITCHOVER IN DOUBT at checkpoint {n}: {e}; this host's stack is down, its role still primary")
    raise DmreplError(f"switchover in doubt: the secondary did not confirm its takeover at checkpoint {n} ({e})",
                      f"see `dmrepl status {name}` on the other host: if it took over, here run "
                      f"`dmrepl resolve {name} --discard-my-data` (nothing is lost: checkpoint {n} held every "
                      f"write) and `dmrepl up {name}`; if not, `dmrepl up {name}` here") from None
