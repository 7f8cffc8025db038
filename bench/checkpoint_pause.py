"""Checkpoint pause: dmrepl's ioctl layer against the same sequence scripted with dmsetup.

Run inside the test VM (scripts/bench).  Both paths act on the same kind of
stack, built on loop devices over sparse files:

    active (linear) -> hidden (snapshot S Hk P 8) ; origin (snapshot-origin S)

One checkpoint cycle = zero the next store's header, suspend active, hidden,
origin, load hidden on the other store, resume origin, hidden, active: 8 steps.
The dmsetup path runs each step as a process (dd for the header), as an admin's
script would; dmrepl's path runs them as ioctls in one process.  Prints the
median and best of each and the ratio (target: dmrepl >= 10x faster).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dmrepl.kernel import blockdev, dm, loop  # noqa: E402
from dmrepl.kernel.tables import Linear, Snapshot, SnapshotOrigin  # noqa: E402
from dmrepl.names import UUID_PREFIX  # noqa: E402

MiB = 1 << 20
DISK_BYTES = 256 * MiB
STORE_BYTES = 64 * MiB
CHUNK_SECTORS = 8


class Stack:
    def __init__(self, ctl: dm.Control, prefix: str, workdir: str):
        self.ctl = ctl
        self.prefix = prefix
        self.loops = []
        self.names = []
        files = {}
        for part, size in (("disk", DISK_BYTES), ("h0", STORE_BYTES), ("h1", STORE_BYTES)):
            path = os.path.join(workdir, f"{prefix}{part}.img")
            with open(path, "wb") as f:
                f.truncate(size)
            files[part] = loop.attach(path)
            self.loops.append(files[part])
        self.disk, self.stores = files["disk"], [files["h0"], files["h1"]]
        self.current = 0
        self.sectors = DISK_BYTES // 512
        self.origin, self.hidden, self.active = (f"{prefix}origin", f"{prefix}hidden", f"{prefix}active")
        for name in (self.origin, self.hidden, self.active):
            ctl.create(name, f"{UUID_PREFIX}bench-{name}")
            self.names.append(name)
        ctl.load(self.origin, [SnapshotOrigin(0, self.sectors, self.disk)])
        ctl.load(self.hidden, [Snapshot(0, self.sectors, self.disk, self.stores[0], "P", CHUNK_SECTORS)])
        ctl.resume(self.hidden)
        ctl.resume(self.origin)
        ctl.load(self.active, [Linear(0, self.sectors, ctl.info(self.hidden).devno, 0)])
        ctl.resume(self.active)

    def dirty(self):
        # Give the store something to hold: primary writes and consumer writes.
        blockdev.write_at(f"/dev/mapper/{self.origin}", 0, b"\x22" * MiB)
        blockdev.write_at(f"/dev/mapper/{self.active}", 8 * MiB, b"\x33" * MiB)

    def checkpoint_ioctls(self) -> float:
        nxt = 1 - self.current
        t0 = time.perf_counter()
        blockdev.write_at(self.stores[nxt], 0, bytes(4096))
        self.ctl.suspend(self.active)
        self.ctl.suspend(self.hidden)
        self.ctl.suspend(self.origin)
        self.ctl.load(self.hidden, [Snapshot(0, self.sectors, self.disk, self.stores[nxt], "P", CHUNK_SECTORS)])
        self.ctl.resume(self.origin)
        self.ctl.resume(self.hidden)
        self.ctl.resume(self.active)
        dt = time.perf_counter() - t0
        self.current = nxt
        return dt

    def checkpoint_dmsetup(self) -> float:
        nxt = 1 - self.current
        table = f"0 {self.sectors} snapshot {self.disk} {self.stores[nxt]} P {CHUNK_SECTORS}"
        steps = [
            ["dd", "if=/dev/zero", f"of={self.stores[nxt]}", "bs=4096", "count=1", "oflag=direct", "status=none"],
            ["dmsetup", "suspend", self.active],
            ["dmsetup", "suspend", self.hidden],
            ["dmsetup", "suspend", self.origin],
            ["dmsetup", "load", self.hidden, "--table", table],
            ["dmsetup", "resume", self.origin],
            ["dmsetup", "resume", self.hidden],
            ["dmsetup", "resume", self.active],
        ]
        t0 = time.perf_counter()
        for argv in steps:
            subprocess.run(argv, check=True)
        dt = time.perf_counter() - t0
        self.current = nxt
        return dt

    def teardown(self):
        dm.remove_tree(self.ctl, reversed(self.names))
        for dev in self.loops:
            loop.detach(dev)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cycles", type=int, default=10)
    args = p.parse_args()
    if not os.path.exists(dm.CONTROL_PATH):
        print("bench: device-mapper missing: run through scripts/bench (the test VM)", file=sys.stderr)
        return 2
    results = {}
    with dm.Control() as ctl, tempfile.TemporaryDirectory(prefix="dmrepl-bench-") as wd:
        for label, method in (("dmrepl ioctls", "checkpoint_ioctls"), ("dmsetup script", "checkpoint_dmsetup")):
            stack = Stack(ctl, f"bench-{method.split('_')[1]}-", wd)
            try:
                times = []
                for _ in range(args.cycles):
                    stack.dirty()
                    times.append(getattr(stack, method)())
                results[label] = times
            finally:
                stack.teardown()
    print(f"checkpoint pause, {args.cycles} cycles each (8 steps: header zero, 3 suspends, load, 3 resumes)")
    for label, times in results.items():
        print(f"  {label:<15} median {statistics.median(times) * 1000:9.2f} ms   "
              f"best {min(times) * 1000:9.2f} ms   worst {max(times) * 1000:9.2f} ms")
    ratio = statistics.median(results["dmsetup script"]) / statistics.median(results["dmrepl ioctls"])
    verdict = "meets" if ratio >= 10 else "MISSES"
    print(f"  ratio (dmsetup / dmrepl, medians): {ratio:.1f}x  -- {verdict} the >= 10x target")
    return 0


if __name__ == "__main__":
    sys.exit(main())
