"""A randomized fault campaign on one pair of daemons (kernel tier; `scripts/campaign N [SEED]`).

Each scenario: a random writer runs (every write with a deadline); between scenarios it stops for
a checkpoint, whose image of P is kept (its digest); a random fault strikes the secondary --
its daemon killed, its nbdkit killed, its link down, 100% packet loss, a power loss (its daemon
killed, its devices removed) -- either while the pair replicates or in the middle of the resync
that repairs the previous fault.  Then:
  - while the secondary is away or resyncing, its view equals the last checkpoint's image;
  - once repaired and resynced, with the writer stopped, P == S byte for byte;
  - no write took 5 s or more; at the end, nothing is left (the kernel tier's sweep).
CI runs DMREPL_CAMPAIGN_N (default 20) scenarios of one seed; docs/campaign.md records runs with theirs.
"""

from __future__ import annotations

import hashlib
import os
import random
import signal
import time

from daemons_lab import ACTIVE, DISK, Writer, image

from dmrepl import poll
from dmrepl.kernel import blockdev

KiB = 1024
STALL_BOUND_S = 5.0     # the default bound for a write after a fault
FAULTS = ("daemon killed", "nbdkit killed", "link down", "packet loss", "power loss")


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _p(hosts) -> bytes:
    with open(hosts.dir / "p.img", "rb") as f:
        return f.read()


class Campaign:
    def __init__(self, hosts, seed: int):
        self.hosts, self.rnd = hosts, random.Random(seed)
        self.view = ""          # digest of the image at the last checkpoint
        self.log: list[str] = []

    def checkpoint(self) -> None:
        r = self.hosts.cli("p", "checkpoint")
        assert r.returncode == 0, r.stderr
        self.view = _digest(_p(self.hosts))
        assert _digest(blockdev.read_at(ACTIVE, 0, DISK)) == self.view

    def check_view(self, when: str) -> None:
        if os.path.exists(ACTIVE):      # not during a power loss
            assert _digest(blockdev.read_at(ACTIVE, 0, DISK)) == self.view, f"view moved {when}"

    def fault(self, kind: str) -> None:
        h = self.hosts
        if kind == "daemon killed":
            os.kill(h.procs["s"].pid, signal.SIGKILL)
            h.procs["s"].wait()
        elif kind == "nbdkit killed":
            os.kill(int((h.dir / "s-state" / "r5" / "export.pid").read_text()), signal.SIGKILL)
        elif kind == "link down":
            h.lab.link_down("s")
        elif kind == "packet loss":
            h.lab.loss("s", 100)
        else:
            os.kill(h.procs["s"].pid, signal.SIGKILL)
            h.procs["s"].wait()
            assert h.cli("s", "down", "--force").returncode == 0

    def repair(self, kind: str) -> None:
        h = self.hosts
        if kind in ("daemon killed", "power loss"):
            h.start_secondary()
        elif kind == "link down":
            h.lab.link_up("s")
        elif kind == "packet loss":
            h.lab.loss("s", 0)

    def wait(self, w: Writer, what: str, ok, timeout: float = 300):
        def probe():
            w.check_deadline()
            return self.hosts.status()
        return poll.wait_for(probe, what, ok=ok, timeout=timeout, interval=0.05)

    def scenario(self, i: int) -> None:
        kind = self.rnd.choice(FAULTS)
        during_resync = self.rnd.random() < 0.4
        second = self.rnd.choice(FAULTS) if during_resync else None
        blocks = self.rnd.sample(range(DISK // (4 * KiB)), 64)
        with Writer(blocks, pause_s=self.rnd.choice((0.0, 0.01, 0.05))) as w:
            time.sleep(self.rnd.uniform(0.1, 1.0))
            self.fault(kind)
            self.wait(w, f"{kind}: degraded", lambda s: s["state"] == "degraded")
            self.check_view(f"after {kind}")
            time.sleep(self.rnd.uniform(0.1, 1.0))
            self.repair(kind)
            if second is not None:
                s = self.wait(w, f"{kind}: resync", lambda s: s["state"] in ("resyncing", "replicating"))
                # A resync that already ended took its checkpoint: the view moved to a P the writer changed.
                view_known = s["state"] == "resyncing"
                self.fault(second)
                s = self.wait(w, f"{second} during the resync: degraded", lambda s: s["state"] == "degraded")
                if view_known and not any(h["event"] == "resynced" for h in s["history"][-3:]):
                    self.check_view(f"after {second} during the resync")
                self.repair(second)
            s = self.wait(w, "replicating again", lambda s: s["state"] == "replicating")
        p = _p(self.hosts)
        with open(self.hosts.dir / "s.img", "rb") as f:
            assert f.read() == p, f"scenario {i}: P != S after {kind}{' + ' + second if second else ''}"
        for blk, data in w.last.items():
            assert p[blk * 4 * KiB:(blk + 1) * 4 * KiB] == data, (i, blk)
        longest = max([d for _t, d in w.latencies] or [0])
        assert longest < STALL_BOUND_S, f"scenario {i}: a write took {longest:.2f} s ({kind}, {second})"
        r = s["last_resync"]
        self.log.append(f"{i}: {kind}{' then ' + second + ' during the resync' if second else ''}: "
                        f"longest write {longest:.2f} s, "
                        f"{r.get('differing_bytes', 0) >> 10} KiB differed, sent {r.get('sent_bytes', 0) >> 10} KiB")
        self.checkpoint()   # the resync's own checkpoint moved the view to a P the writer changed


def test_fault_campaign(hosts):
    n = int(os.environ.get("DMREPL_CAMPAIGN_N", "20"))
    # CI replays one seed (scripts/campaign picks a new one each run): a landing should not depend
    # on the draw; new seeds are for the long runs recorded in docs/campaign.md.
    seed = int(os.environ.get("DMREPL_CAMPAIGN_SEED", "1795730550"))
    print(f"\ncampaign: {n} scenarios, seed {seed} (DMREPL_CAMPAIGN_SEED={seed} repeats it)")
    hosts.nbd_timeout_s = 5                 # the default: bounds a stall the signs above miss
    hosts.write_configs(primary="reconnect_interval_s = 0.5\n")
    image(hosts.dir / "s.img", DISK, b"\x11")
    hosts.start_secondary()
    hosts.start_primary("--assume-clean")
    c = Campaign(hosts, seed)
    c.checkpoint()
    t0 = time.monotonic()
    try:
        for i in range(n):
            c.scenario(i)
    finally:
        print("\n".join(c.log))
    print(f"campaign: {n} scenarios passed in {time.monotonic() - t0:.0f} s, seed {seed}")
