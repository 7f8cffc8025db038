"""The consumer's write latency during a resync, with and without a rate limit; dmrepl against DRBD.

In the test VM: DMREPL_BENCH=resync_latency scripts/bench

A writer on the primary's device (4 KiB O_DIRECT writes at random places of a 16 MiB zone, 5 ms
apart) is timed while the pair replicates (the baseline), then while a resync copies what was
written during a disconnection (the "spread" pattern of bench/resync.py: 64 MiB in 1 MiB writes;
the writer pauses while the peer is away, so that the resync's pieces are that pattern's alone):
  dmrepl  no limit (the kernel's mirror recovery as fast as it goes), then resync_max 8M,
          resync_min 1M, resync_share 0.5 (`dmrepl tune`: at most 4 MiB/s while the consumer writes)
  DRBD    8.4 protocol C over loopback: its fixed-rate controller (c-plan-ahead 0) at 4 GiB/s, then
          at 4 MiB/s (resync-rate; its c-min-rate, 250 KiB/s by default, slows a resync further while
          the application writes)
Printed: the resync's time and the writer's median and p99 during it, against its baseline.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import statistics
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from primary import DRBD_MINORS, DRBD_PORTS, DRBD_RESOURCES, HOST, drbd_pair, drbdsetup  # noqa: E402
from resync import dmrepl_pair, drbd_in_sync, drbd_without_helpers, resyncs, say, write_pattern  # noqa: E402

from dmrepl import poll  # noqa: E402
from dmrepl.daemon import control  # noqa: E402
from dmrepl.kernel import blockdev  # noqa: E402
from dmrepl.names import StackNames  # noqa: E402

KiB, MiB = 1 << 10, 1 << 20
ZONE = 16 * MiB
NOTES: list[str] = []      # printed after the table (the VM's console may drop stderr lines)
BASELINE_S = 6.0


class Probe:
    """The consumer: timed 4 KiB writes in a thread; `between(t0, t1)` the latencies that began then."""

    def __init__(self, path: str, seed: int):
        self.path, self.rnd = path, random.Random(seed)
        self.lat: list[tuple[float, float]] = []
        self.stop = threading.Event()
        self.running = threading.Event()
        self.running.set()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        data = os.urandom(4 * KiB)
        while not self.stop.is_set():
            if not self.running.wait(0.1):
                continue
            t = time.monotonic()
            blockdev.write_at(self.path, self.rnd.randrange(ZONE // (4 * KiB)) * 4 * KiB, data)
            self.lat.append((t, time.monotonic() - t))
            time.sleep(0.005)

    def __enter__(self) -> "Probe":
        self.thread.start()
        return self

    @contextlib.contextmanager
    def paused(self):
        self.running.clear()
        time.sleep(0.2)               # a write in flight ends
        try:
            yield
        finally:
            self.running.set()

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join(timeout=60)

    def between(self, t0: float, t1: float) -> list[float]:
        return [d for t, d in self.lat if t0 <= t < t1]


def flushes(dev: str) -> int:
    """Flush requests completed by block device `dev` (/sys/block/DEV/stat, field 15;
    Documentation/block/stat.rst)."""
    with open(f"/sys/block/{os.path.basename(dev)}/stat") as f:
        return int(f.read().split()[14])


def figures(lat: list[float]) -> dict:
    return {"n": len(lat), "median": statistics.median(lat), "p99": statistics.quantiles(lat, n=100)[-1]}


def dmrepl_rounds(disk: int) -> list[tuple[str, float, dict, dict]]:
    out = []
    with contextlib.ExitStack() as es:
        work = es.enter_context(tempfile.TemporaryDirectory(prefix="dmrepl-bench-lat-"))
        pair = dmrepl_pair(es, work, disk)
        poll.wait_for(pair.status, "replicating", ok=lambda s: s and s["state"] == "replicating", timeout=600)
        top = StackNames("demo").mapper_path_top()
        with Probe(top, 1) as probe:
            t0 = time.monotonic()
            time.sleep(BASELINE_S)
            base = figures(probe.between(t0, time.monotonic()))
            for seed, (label, tune) in enumerate((("no limit", None),
                                                  ("resync_max 8M, min 1M, share 0.5",
                                                   {"resync_max": 8 * MiB, "resync_min": MiB, "resync_share": 0.5}))):
                if tune:
                    control.request(pair.socket, "tune", **tune)
                before = resyncs(pair.status())
                with probe.paused():
                    pair.lab.link_down("s")
                    poll.wait_for(pair.status, "degraded", ok=lambda s: s["state"] == "degraded", timeout=60)
                    write_pattern(top, disk, "spread", 10 + seed)
                    t1 = time.monotonic()
                    pair.lab.link_up("s")
                s = poll.wait_for(pair.status, "the resync's copy", timeout=900, interval=0.1,
                                  ok=lambda s: (s["resync"] or {}).get("phase") == "copying"
                                  or s["state"] == "replicating" and resyncs(s) > before)
                nbd, t_copy = s["nbd"], time.monotonic()
                f0 = flushes(nbd)
                s = poll.wait_for(pair.status, "the resync", timeout=900, interval=0.2,
                                  ok=lambda s: s["state"] == "replicating" and resyncs(s) > before)
                t2 = time.monotonic()
                f1 = flushes(nbd)
                r = s["last_resync"]
                writes = len(probe.between(t_copy, t2))
                NOTES.append(f"dmrepl {label}: resync {t2 - t1:.1f} s ({r['copy_bytes'] >> 20} MiB copied in "
                    f"{r['copy_seconds']:.1f} s as {r['copy_bytes'] // r['copy_region_bytes']} region(s) of "
                    f"{r['copy_region_bytes'] >> 10} KiB, {r['batches']} batch(es)); {f1 - f0} flushes of {nbd} "
                    f"during the copy, {writes} consumer writes")
                say(NOTES[-1])
                out.append((f"dmrepl, {label}", t2 - t1, base, figures(probe.between(t1, t2))))
    return out


def drbd_rounds(disk: int) -> list[tuple[str, float, dict, dict]]:
    out = []
    minor = DRBD_MINORS[0]
    here, there = f"ipv4:{HOST}:{DRBD_PORTS[0]}", f"ipv4:{HOST}:{DRBD_PORTS[1]}"
    with contextlib.ExitStack() as es:
        work = es.enter_context(tempfile.TemporaryDirectory(prefix="dmrepl-bench-lat-"))
        path = es.enter_context(drbd_pair(work, disk))
        es.enter_context(drbd_without_helpers())
        with Probe(path, 1) as probe:
            t0 = time.monotonic()
            time.sleep(BASELINE_S)
            base = figures(probe.between(t0, time.monotonic()))
            for seed, (label, rate) in enumerate((("c-plan-ahead 0, resync-rate 4G", "4G"),
                                                  ("c-plan-ahead 0, resync-rate 4M", "4M"))):
                for m in DRBD_MINORS:           # the sync source's setting rules; both alike
                    drbdsetup("disk-options", str(m), "--c-plan-ahead=0", f"--resync-rate={rate}")
                with probe.paused():
                    drbdsetup("disconnect", here, there)
                    write_pattern(path, disk, "spread", 10 + seed)
                    t1 = time.monotonic()
                    drbdsetup("connect", DRBD_RESOURCES[0], here, there, "--protocol=C")
                drbd_in_sync(minor, timeout=900)
                t2 = time.monotonic()
                say(f"drbd {label}: resync {t2 - t1:.1f} s")
                out.append((f"DRBD, {label}", t2 - t1, base, figures(probe.between(t1, t2))))
    return out


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--disk-mib", type=int, default=256)
    args = p.parse_args()
    disk = args.disk_mib * MiB
    rows = drbd_rounds(disk) + dmrepl_rounds(disk)
    print(f"\nthe consumer's 4 KiB writes during a resync of 64 MiB (1 MiB writes made while disconnected); "
          f"{args.disk_mib} MiB disks, {os.cpu_count()} vCPU(s)")
    print("| peer, resync limit | resync time | writes | median | p99 | median / baseline | p99 / baseline |")
    print("|---|---|---|---|---|---|---|")
    for label, took, base, dur in rows:
        if label.endswith(("no limit", "4G")):
            print(f"| {label.split(',')[0]}, no resync (baseline) | - | {base['n']} | {base['median'] * 1000:.2f} ms | "
                  f"{base['p99'] * 1000:.2f} ms | 1 | 1 |")
        print(f"| {label} | {took:.1f} s | {dur['n']} | {dur['median'] * 1000:.2f} ms | {dur['p99'] * 1000:.2f} ms | "
              f"{dur['median'] / base['median']:.2f}x | {dur['p99'] / base['p99']:.2f}x |")
    print("\n".join(NOTES))
    return 0


if __name__ == "__main__":
    sys.exit(main())
