"""A randomized fault campaign on one pair of hosts that change roles (kernel tier; `scripts/campaign N [SEED]`).

Both hosts have both roles' sections (daemons_lab.both_roles).  Each scenario runs a random writer
on the primary (every write with a deadline); between scenarios it stops for a checkpoint, whose
image is kept.  A scenario is one of:
  - a fault of the secondary -- its daemon killed, its nbdkit killed, its link down, 100% packet
    loss, a power loss (its daemon killed, its devices removed) -- while the pair replicates, maybe
    followed by a second one in the middle of the resync that repairs it;
  - a fault of the secondary at a random moment of a checkpoint (the writer stopped before it, so
    that the checkpoint's image is known): the view is then the old image or the new one;
  - the primary's daemon killed (the next `up` takes its stack over, then resyncs);
  - a power loss of the primary (its daemon killed, its writer stopped, its devices removed, the
    NBD device too): `up` builds the stack from the disks and resyncs what era recorded;
  - a failover: the secondary takes over while the primary writes on, its consumer writes, maybe
    through a split brain (it comes up as primary while the old one still is), then the failback:
    the old primary gives its writes up and follows, maybe with a fault of it during that resync.
After each: the secondary's view equals the last checkpoint's image while it is away or resyncing
and right after a failover; once resynced, P == S byte for byte, and every block holds its last
write (the new primary's writes after a failover); no write took 5 s or more; at the end, nothing
is left (the kernel tier's sweep).  The first nine scenarios take each kind once (KINDS' order),
then kinds are drawn.  CI runs DMREPL_CAMPAIGN_N (default 10: every kind, and one drawn) scenarios
of one seed (20 took 11 minutes on a quiet host and over 20 beside a CPU-bound process: too much of
CI's hour); docs/campaign.md records the long runs, in parts, with their seeds.
"""

from __future__ import annotations

import hashlib
import os
import random
import signal
import threading
import time

import pytest
from daemons_lab import DISK, Writer, both_roles, cli_of, image, name_of, socket_of, status_of, up_as

from dmrepl import poll
from dmrepl.daemon import control
from dmrepl.kernel import blockdev
from dmrepl.names import StackNames

KiB = 1024
B4 = 4 * KiB
STALL_BOUND_S = 5.0     # the default bound for a write after a fault
FAULTS = ("daemon killed", "nbdkit killed", "link down", "packet loss", "power loss")
KINDS = FAULTS + ("fault during a checkpoint", "primary daemon killed", "primary power loss", "failover")


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Campaign:
    def __init__(self, hosts, seed: int):
        self.hosts, self.rnd = hosts, random.Random(seed)
        self.pri, self.sec = "p", "s"
        self.started = 0.0
        self.view = b""          # the image at the last checkpoint
        self.log: list[str] = []

    # -- the pair as it stands --------------------------------------------------------

    @property
    def top(self) -> str:
        return StackNames(name_of(self.pri)).mapper_path_top()

    @property
    def active(self) -> str:
        return StackNames(name_of(self.sec)).mapper_path("active")

    def disk(self, host: str) -> bytes:
        with open(self.hosts.dir / f"{host}.img", "rb") as f:
            return f.read()

    def status(self) -> dict | None:
        assert self.hosts.procs[self.pri].poll() is None, f"the primary's daemon on {self.pri} exited"
        return status_of(self.hosts, self.pri)

    def cli(self, host: str, *argv: str) -> str:
        r = cli_of(self.hosts, host, *argv)
        assert r.returncode == 0, (host, argv, r.stdout, r.stderr)
        return r.stdout

    def wait(self, w: Writer | None, what: str, ok, timeout: float = 300):
        def probe():
            if w is not None:
                w.check_deadline()
            return self.status()
        return poll.wait_for(probe, what, ok=lambda s: s is not None and ok(s), timeout=timeout, interval=0.05)

    def checkpoint(self) -> None:
        # Straight to the daemon's control socket, as `dmrepl checkpoint` does (test_daemons runs the
        # CLI): a Python start is 4-5 s under TCG, and this runs once a scenario.
        control.request(socket_of(self.hosts, self.pri), "checkpoint", timeout=120)
        self.view = self.disk(self.pri)
        assert _digest(blockdev.read_at(self.active, 0, DISK)) == _digest(self.view)

    def check_view(self, when: str) -> None:
        if os.path.exists(self.active):      # not during a power loss
            assert _digest(blockdev.read_at(self.active, 0, DISK)) == _digest(self.view), f"view moved {when}"

    # -- faults of the secondary ----------------------------------------------------------

    def fault(self, kind: str) -> None:
        h, sec = self.hosts, self.sec
        if kind in ("daemon killed", "power loss"):
            os.kill(h.procs[sec].pid, signal.SIGKILL)
            h.procs[sec].wait()
            if kind == "power loss":
                self.cli(sec, "down", "--force")
        elif kind == "nbdkit killed":
            os.kill(int((h.dir / f"{sec}-state" / name_of(sec) / "export.pid").read_text().split()[0]), signal.SIGKILL)
        elif kind == "link down":
            h.lab.link_down(sec)
        else:
            h.lab.loss(sec, 100)

    def repair(self, kind: str) -> None:
        if kind in ("daemon killed", "power loss"):
            up_as(self.hosts, self.sec, "secondary")
        elif kind == "link down":
            self.hosts.lab.link_up(self.sec)
        elif kind == "packet loss":
            self.hosts.lab.loss(self.sec, 0)

    def fault_during_resync(self, w: Writer | None, first: str, view_kept: bool = True) -> str | None:
        """Maybe a second fault while the resync runs; returns it.  `view_kept`: the secondary's view
        is the last checkpoint's meanwhile (not after a failback's resolve: it is its own disk)."""
        if self.rnd.random() >= 0.4:
            return None
        second = self.rnd.choice(FAULTS)
        s = self.wait(w, f"{first}: resync", lambda s: s["state"] in ("resyncing", "replicating"))
        # A resync that already ended took its checkpoint: the view moved to a P the writer changed.
        view_known = view_kept and s["state"] == "resyncing"
        self.fault(second)
        s = self.wait(w, f"{second} during the resync: degraded", lambda s: s["state"] == "degraded")
        if view_known and not any(h["event"] == "resynced" for h in s["history"][-3:]):
            self.check_view(f"after {second} during the resync")
        self.repair(second)
        return second

    # -- scenarios ----------------------------------------------------------------------

    def scenario(self, i: int) -> None:
        self.started = time.monotonic()
        # Every kind once first (CI's short run covers them all), then drawn.
        kind = KINDS[i] if i < len(KINDS) else self.rnd.choice(KINDS)
        blocks = self.rnd.sample(range(DISK // B4), 64)
        pause = self.rnd.choice((0.0, 0.01, 0.05))
        if kind == "failover":
            return self.failover(i, blocks, pause)
        if kind == "primary power loss":
            return self.primary_power_loss(i, blocks, pause)
        if kind == "fault during a checkpoint":
            return self.checkpoint_interrupted(i, blocks, pause)
        with Writer(blocks, pause_s=pause, path=self.top) as w:
            time.sleep(self.rnd.uniform(0.1, 1.0))
            if kind == "primary daemon killed":
                os.kill(self.hosts.procs[self.pri].pid, signal.SIGKILL)
                self.hosts.procs[self.pri].wait()
                time.sleep(self.rnd.uniform(0.1, 1.0))
                up_as(self.hosts, self.pri, "primary")
                second = None
            else:
                self.fault(kind)
                self.wait(w, f"{kind}: degraded", lambda s: s["state"] == "degraded")
                self.check_view(f"after {kind}")
                time.sleep(self.rnd.uniform(0.1, 1.0))
                self.repair(kind)
                second = self.fault_during_resync(w, kind)
            s = self.wait(w, "replicating again", lambda s: s["state"] == "replicating")
        self.settled(i, f"{kind}{' then ' + second + ' during the resync' if second else ''}", w.last, w, s)

    def checkpoint_interrupted(self, i: int, blocks: list[int], pause: float) -> None:
        """A fault of the secondary 0-60 ms into a checkpoint (one takes tens of ms here): before it,
        in the middle of its two hosts' switches, or after (a daemon killed between the switch's
        suspend and resume leaves its devices suspended: `up` finishes the switch as the state
        file says).  The view is then exactly the old image or the new one."""
        with Writer(blocks, pause_s=pause, path=self.top) as w:
            time.sleep(self.rnd.uniform(0.1, 0.5))
        image = self.disk(self.pri)
        kind = self.rnd.choice(FAULTS)
        outcome: dict = {}

        def take():
            try:
                outcome["done"] = control.request(socket_of(self.hosts, self.pri), "checkpoint", timeout=120)
            except Exception as e:   # noqa: BLE001 -- a failed checkpoint is one of the outcomes
                outcome["failed"] = e

        taker = threading.Thread(target=take)
        taker.start()
        time.sleep(self.rnd.uniform(0.0, 0.06))
        self.fault(kind)
        taker.join(timeout=150)
        assert not taker.is_alive(), f"scenario {i}: the checkpoint did not return after {kind}"
        self.wait(None, f"{kind} during a checkpoint: degraded", lambda s: s["state"] == "degraded")
        # Read only once repaired: a daemon killed inside the switch leaves the view suspended
        # until `up` finishes the switch.  P has not changed since `image`, so whatever checkpoint
        # the resync takes meanwhile, the view stays one of the two.
        self.repair(kind)
        if os.path.exists(self.active):
            view = _digest(blockdev.read_at(self.active, 0, DISK))
            assert view in (_digest(self.view), _digest(image)), f"scenario {i}: the view after {kind}"
        s = self.wait(None, "replicating again", lambda s: s["state"] == "replicating")
        self.settled(i, f"{kind} during a checkpoint ({'it completed' if 'done' in outcome else 'it failed'})",
                     w.last, w, s)

    def primary_power_loss(self, i: int, blocks: list[int], pause: float) -> None:
        """The primary's host goes: its daemon is killed under the writer, then everything of it is
        removed (what was acknowledged is on its disk); the secondary keeps its view meanwhile."""
        nbd = os.path.basename(self.status()["nbd"])
        with Writer(blocks, pause_s=pause, path=self.top) as w:
            time.sleep(self.rnd.uniform(0.1, 1.0))
            os.kill(self.hosts.procs[self.pri].pid, signal.SIGKILL)
            self.hosts.procs[self.pri].wait()
            time.sleep(self.rnd.uniform(0.0, 0.5))
        self.cli(self.pri, "down")                    # no daemon: stack, NBD device, loop devices
        poll.wait_for(lambda: os.path.exists(f"/sys/block/{nbd}/pid"), f"{nbd} released", ok=lambda x: not x,
                      timeout=10)
        self.check_view("after the primary's power loss")
        time.sleep(self.rnd.uniform(0.1, 1.0))
        up_as(self.hosts, self.pri, "primary")
        s = self.wait(None, "replicating again", lambda s: s["state"] == "replicating")
        self.settled(i, "primary power loss", w.last, w, s)

    def failover(self, i: int, blocks: list[int], pause: float) -> None:
        """The secondary takes over; the old primary follows it after a failback (maybe through a split
        brain, maybe with a fault of it during the failback's resync).  The roles are swapped after."""
        old, new = self.pri, self.sec
        with Writer(blocks, pause_s=pause, path=self.top) as w:
            time.sleep(self.rnd.uniform(0.1, 1.0))
            self.cli(new, "failover")                 # fences the export: the old primary degrades
            assert blockdev.read_at(self.active, 0, DISK) == self.view, f"scenario {i}: the taken-over view"
            self.wait(w, "the old primary to degrade", lambda s: s["state"] == "degraded")
        active = self.active
        own = {b: f"{new}:{b}:{i}:".encode().ljust(B4, b"n") for b in self.rnd.sample(range(DISK // B4), 16)}
        for b, data in own.items():
            blockdev.write_at(active, b * B4, data)   # the new primary's consumer
        split = self.rnd.random() < 0.5
        self.cli(new, "down")
        if split:                                     # up as primary while the old one still is
            self.pri = new
            up_as(self.hosts, new, "primary")
            self.wait(None, "the split brain", lambda s: bool(s.get("split_brain")), timeout=120)
            assert status_of(self.hosts, old)["state"] == "degraded"
        self.cli(old, "down")
        self.hosts.procs[old].wait(timeout=60)
        self.cli(old, "resolve", "--discard-my-data")
        self.pri, self.sec = new, old
        up_as(self.hosts, old, "secondary")
        if not split:
            up_as(self.hosts, new, "primary")
        second = self.fault_during_resync(None, "failback", view_kept=False)
        s = self.wait(None, "the failback", lambda s: s["state"] == "replicating")
        expected = bytearray(self.view)
        for b, data in own.items():
            expected[b * B4:(b + 1) * B4] = data
        assert self.disk(new) == bytes(expected), f"scenario {i}: the new primary's data after the failback"
        self.settled(i, f"failover from {old} to {new}{', split brain' if split else ''}"
                     f"{', then ' + second + ' during the failback' if second else ''}", own, w, s)

    def settled(self, i: int, what: str, last: dict[int, bytes], w: Writer, s: dict) -> None:
        p = self.disk(self.pri)
        assert self.disk(self.sec) == p, f"scenario {i}: P != S after {what}"
        for blk, data in last.items():
            assert p[blk * B4:(blk + 1) * B4] == data, (i, blk)
        longest = max([d for _t, d in w.latencies] or [0])
        assert longest < STALL_BOUND_S, f"scenario {i}: a write took {longest:.2f} s ({what})"
        r = s.get("last_resync") or {}
        # Changed: the scenario writer's blocks (it started after the last checkpoint); a failover's
        # resync also carries the other host's writes, which this does not count.
        changed = w.changed_bytes()
        self.log.append(f"{i}: {what}: longest write {longest:.2f} s, {changed >> 10} KiB changed by the writer, "
                        f"compared {r.get('candidate_bytes', 0) >> 10} KiB, {r.get('differing_bytes', 0) >> 10} KiB "
                        f"differed, sent {r.get('sent_bytes', 0) >> 10} KiB ({time.monotonic() - self.started:.0f} s)")
        self.checkpoint()   # the resync's own checkpoint moved the view to a P the writer changed


CAMPAIGN_N = int(os.environ.get("DMREPL_CAMPAIGN_N", "10"))


# A scenario takes 25-35 s on a quiet host, about 50 s on a loaded one; a hang fails the test
# before the VM is killed (scripts/campaign gives the VM 900 + 110 N seconds).
@pytest.mark.timeout(300 + 100 * CAMPAIGN_N, method="signal")
def test_fault_campaign(hosts):
    n = CAMPAIGN_N
    # CI replays one seed (scripts/campaign picks a new one each run): a landing should not depend
    # on the draw; new seeds are for the long runs recorded in docs/campaign.md.
    seed = int(os.environ.get("DMREPL_CAMPAIGN_SEED", "1795730550"))
    print(f"\ncampaign: {n} scenarios, seed {seed} (DMREPL_CAMPAIGN_SEED={seed} repeats it)")
    both_roles(hosts)
    image(hosts.dir / "s.img", DISK, b"\x11")
    c = Campaign(hosts, seed)
    up_as(hosts, "s", "secondary")
    up_as(hosts, "p", "primary", "--assume-clean")
    c.wait(None, "the pair to replicate", lambda s: s["state"] == "replicating")
    c.checkpoint()
    t0 = time.monotonic()
    try:
        for i in range(n):
            c.scenario(i)
    finally:
        print("\n".join(c.log))
        for host in ("p", "s"):
            cli_of(hosts, host, "down", "--force")     # the fixture knows only host p's name
    print(f"campaign: {n} scenarios passed in {time.monotonic() - t0:.0f} s, seed {seed}")
