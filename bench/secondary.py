"""Secondary-side benchmarks: checkpoint pause, failover switch, copy-before-write cost.

Run inside the test VM (the host kernel has no device-mapper):

    scripts/vm -- python bench/secondary.py [--cycles N] [--only NAME] ...

Every stack is a real dmrepl.secondary.Secondary over loop devices on sparse
files in a temp dir (the guest's /tmp, a ~1 GB tmpfs: data written counts, so
each stack deletes its files as soon as it is down).  A "primary write" is a
write to dmrepl-NAME-origin (what the NBD server does), a "consumer write" a
write to dmrepl-NAME-active.  Writes are O_DIRECT|O_DSYNC, as durable as an
NBD server's.

1. checkpoint: the pause of Secondary.checkpoint() (suspend active, hidden,
   origin; load hidden on the other store; resume: ioctls in one process)
   against the same steps scripted as dmsetup processes on a second, identical
   stack, both after the same primary and consumer writes.  Target: dmrepl
   >= 10x faster (DESIGN.md section 2: "a handful of ioctls, not process spawns").
2. failover: the time of Secondary.failover() (the switch only, not the merge)
   with 1 MiB and with 200 MiB in the hidden store.  The kernel hands the
   exception store over without reading it (dm-snap.c: snapshot handover), so
   the switch should not grow with the data.  Target: ratio <= 1.5.
3. throughput: primary writes into the origin right after a checkpoint (every
   chunk is copied to the hidden store before it is overwritten) against the
   same writes into a plain loop device: 1 MiB sequential and 4 KiB random.
   No target: the cost of copy-before-write, reported.
"""

from __future__ import annotations

import argparse
import mmap
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from typing import Iterator

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dmrepl.config import SecondaryConfig  # noqa: E402
from dmrepl.kernel import blockdev, dm, loop  # noqa: E402
from dmrepl.roles.secondary import Secondary  # noqa: E402

MiB = 1 << 20
KiB = 1 << 10
SECTOR_BYTES = 512
DISK_BYTES = 256 * MiB           # sparse: only what is written takes memory
STORE_BYTES = 256 * MiB          # holds 200 MiB of chunks plus their metadata
CHUNK_SECTORS = 8                # 4 KiB chunks, the config's default
TOOLS = ("dmsetup", "dd", "blkdiscard")

CHECKPOINT_TARGET = 10.0         # dmsetup pause / dmrepl pause, at least
FAILOVER_TARGET = 1.5            # switch time 200 MiB / 1 MiB, at most


def verdict(ok: bool) -> str:
    return "meets" if ok else "MISSES"


def ms(seconds: float) -> str:
    return f"{seconds * 1000:9.2f} ms"


# -- stacks and files ---------------------------------------------------------

def sparse_file(path: str, size_bytes: int) -> str:
    with open(path, "wb") as f:
        f.truncate(size_bytes)
    return path


@contextmanager
def secondary_up(ctl: dm.Control, name: str, *, disk_bytes: int = DISK_BYTES,
                 store_bytes: int = STORE_BYTES) -> Iterator[Secondary]:
    """A Secondary that is up on fresh sparse files; down and deleted afterwards, whatever happened."""
    with tempfile.TemporaryDirectory(prefix=f"dmrepl-bench-{name}-") as wd:
        # Built as tests/kernel/test_secondary.py's make_cfg does; state_dir in the temp dir.
        cfg = SecondaryConfig(
            name=name, resource_id=name, disk=sparse_file(os.path.join(wd, "disk.img"), disk_bytes),
            hidden_stores=(sparse_file(os.path.join(wd, "h0.img"), store_bytes),
                           sparse_file(os.path.join(wd, "h1.img"), store_bytes)),
            listen_host="127.0.0.1", listen_port=10809, chunk_sectors=CHUNK_SECTORS,
            store_fill_warn=0.75, state_dir=os.path.join(wd, "state"), source="bench/secondary.py")
        sec = Secondary(cfg, ctl)
        try:
            sec.up()
            yield sec
        finally:
            sec.down(force=True)


@contextmanager
def plain_loop(size_bytes: int) -> Iterator[str]:
    """A loop device over a fresh sparse file, with no dm stack on it: the raw peer."""
    with tempfile.TemporaryDirectory(prefix="dmrepl-bench-raw-") as wd:
        dev = loop.attach(sparse_file(os.path.join(wd, "raw.img"), size_bytes))
        try:
            yield dev
        finally:
            loop.detach(dev)


# -- writes -------------------------------------------------------------------

@contextmanager
def direct_writer(path: str, io_bytes: int, fill: int = 0x22) -> Iterator:
    """pwrite(offset) of one page-aligned buffer with O_DIRECT|O_DSYNC (mmap memory is aligned)."""
    fd = os.open(path, os.O_WRONLY | os.O_DIRECT | os.O_DSYNC | os.O_CLOEXEC)
    buf = mmap.mmap(-1, io_bytes)
    buf.write(bytes([fill]) * io_bytes)

    def write(offset_bytes: int) -> None:
        if os.pwritev(fd, [buf], offset_bytes) != io_bytes:
            raise OSError(f"short write to {path} at byte {offset_bytes}")

    try:
        yield write
    finally:
        buf.close()
        os.close(fd)


def write_sequential(path: str, offset_bytes: int, length_bytes: int, *, io_bytes: int = MiB,
                     fill: int = 0x22) -> float:
    """Write [offset, offset + length) in io_bytes pieces; returns seconds."""
    with direct_writer(path, io_bytes, fill) as write:
        t0 = time.perf_counter()
        for pos in range(offset_bytes, offset_bytes + length_bytes, io_bytes):
            write(pos)
        return time.perf_counter() - t0


def write_random(path: str, offsets_bytes: list[int], *, io_bytes: int = 4 * KiB) -> float:
    with direct_writer(path, io_bytes, 0x44) as write:
        t0 = time.perf_counter()
        for pos in offsets_bytes:
            write(pos)
        return time.perf_counter() - t0


def dirty(sec: Secondary, cycle: int) -> None:
    """Give the hidden store something to hold: 1 MiB of primary writes, 1 MiB of consumer writes."""
    half = DISK_BYTES // 2
    write_sequential(sec.origin_path, (cycle * MiB) % half, MiB, fill=0x22)
    write_sequential(sec.active_path, half + (cycle * MiB) % half, MiB, fill=0x33)


# -- 1. checkpoint pause ------------------------------------------------------

class DmsetupCheckpoint:
    """The checkpoint as an admin's script runs it on a Secondary's stack: one process per step."""

    def __init__(self, sec: Secondary):
        self.active, self.hidden, self.origin = (sec.stack.dm(p) for p in ("active", "hidden", "origin"))
        self.disk = loop.find(sec.cfg.disk)[0]
        self.stores = [loop.find(s)[0] for s in sec.cfg.hidden_stores]
        self.current = sec.state().current_store
        self.sectors = blockdev.size_bytes(self.disk) // SECTOR_BYTES
        self.chunk_sectors = sec.cfg.chunk_sectors

    @staticmethod
    def _zero_header(store: str) -> list[str]:
        return ["dd", "if=/dev/zero", f"of={store}", "bs=4096", "count=1", "oflag=direct,dsync", "status=none"]

    def run(self) -> tuple[float, float]:
        """One checkpoint; returns (pause seconds: first suspend to last resume, whole script seconds)."""
        old, nxt = self.current, 1 - self.current
        table = f"0 {self.sectors} snapshot {self.disk} {self.stores[nxt]} P {self.chunk_sectors}"
        switch = [
            ["dmsetup", "suspend", self.active],
            ["dmsetup", "suspend", self.hidden],
            ["dmsetup", "suspend", self.origin],
            ["dmsetup", "load", self.hidden, "--table", table],
            ["dmsetup", "resume", self.hidden],
            ["dmsetup", "resume", self.origin],
            ["dmsetup", "resume", self.active],
        ]
        # Afterwards the old store is forgotten, as Secondary.checkpoint does
        # outside its pause: the next checkpoint must find it empty.
        forget = [self._zero_header(self.stores[old]), ["blkdiscard", self.stores[old]]]
        t0 = time.perf_counter()
        subprocess.run(self._zero_header(self.stores[nxt]), check=True)
        t_pause = time.perf_counter()
        for argv in switch:
            subprocess.run(argv, check=True)
        pause = time.perf_counter() - t_pause
        self.current = nxt
        for argv in forget:
            subprocess.run(argv, check=True)
        return pause, time.perf_counter() - t0


def bench_checkpoint(ctl: dm.Control, cycles: int) -> None:
    dmrepl_pause, dmrepl_call = [], []
    with secondary_up(ctl, "bench-ckpt-ioctl") as sec:
        for i in range(cycles):
            dirty(sec, i)
            t0 = time.perf_counter()
            _state, pause = sec.checkpoint()
            dmrepl_call.append(time.perf_counter() - t0)
            dmrepl_pause.append(pause)
    script_pause, script_whole = [], []
    with secondary_up(ctl, "bench-ckpt-dmsetup") as sec:
        script = DmsetupCheckpoint(sec)
        for i in range(cycles):
            dirty(sec, i)
            pause, whole = script.run()
            script_pause.append(pause)
            script_whole.append(whole)

    print(f"1. checkpoint pause, {cycles} cycles each, 1 MiB primary + 1 MiB consumer writes before each")
    rows = (("dmrepl pause", dmrepl_pause, "Secondary.checkpoint()'s returned pause"),
            ("dmsetup pause", script_pause, "3 suspends, load, 3 resumes: 7 processes"),
            ("dmrepl call", dmrepl_call, "whole checkpoint(): header zero, state file, discard"),
            ("dmsetup script", script_whole, "the same plus dd before, dd + blkdiscard after"))
    for label, times, what in rows:
        print(f"   {label:<15} median {ms(statistics.median(times))}   best {ms(min(times))}   "
              f"worst {ms(max(times))}   ({what})")
    ratio = statistics.median(script_pause) / statistics.median(dmrepl_pause)
    whole = statistics.median(script_whole) / statistics.median(dmrepl_call)
    print(f"   ratio dmsetup / dmrepl, pause medians: {ratio:.1f}x  -- "
          f"{verdict(ratio >= CHECKPOINT_TARGET)} the >= {CHECKPOINT_TARGET:.0f}x target")
    print(f"   ratio dmsetup / dmrepl, whole checkpoint: {whole:.1f}x")


# -- 2. failover switch -------------------------------------------------------

def bench_failover(ctl: dm.Control, runs: int, small_mib: int, large_mib: int) -> None:
    print(f"2. failover switch (Secondary.failover(), not the merge), {runs} runs each, fresh stack per run")
    medians = {}
    for data_mib in (small_mib, large_mib):
        switch, merge, held = [], [], []
        for _ in range(runs):
            with secondary_up(ctl, "bench-failover") as sec:
                write_sequential(sec.origin_path, 0, data_mib * MiB)
                held.append(sec.store_health().allocated_bytes)
                t0 = time.perf_counter()
                sec.failover()
                switch.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                sec.wait_merge(timeout=600)
                merge.append(time.perf_counter() - t0)
        medians[data_mib] = statistics.median(switch)
        print(f"   {data_mib:4d} MiB written  store held {statistics.median(held) / MiB:6.1f} MiB   "
              f"switch median {ms(medians[data_mib])}  best {ms(min(switch))}  worst {ms(max(switch))}   "
              f"(merge afterwards {statistics.median(merge):.2f} s)")
    ratio = medians[large_mib] / medians[small_mib]
    print(f"   ratio {large_mib} MiB / {small_mib} MiB, switch medians: {ratio:.2f}  -- "
          f"{verdict(ratio <= FAILOVER_TARGET)} the <= {FAILOVER_TARGET} target")


# -- 3. primary write throughput ----------------------------------------------

def bench_throughput(ctl: dm.Control, seq_mib: int, rand_writes: int, seed: int) -> None:
    rng = random.Random(seed)
    offsets = [rng.randrange(DISK_BYTES // (4 * KiB)) * 4 * KiB for _ in range(rand_writes)]
    seq_bytes = seq_mib * MiB
    with secondary_up(ctl, "bench-cbw") as sec:
        sec.checkpoint()  # an empty store: every chunk written is copied first
        seq_origin = write_sequential(sec.origin_path, 0, seq_bytes)
        copied = sec.store_health().allocated_bytes
        sec.checkpoint()  # empty again, so that the random writes pay the copy too
        rand_origin = write_random(sec.origin_path, offsets)
    with plain_loop(DISK_BYTES) as dev:
        seq_raw = write_sequential(dev, 0, seq_bytes)
        rand_raw = write_random(dev, offsets)

    print("3. primary writes right after a checkpoint (O_DIRECT|O_DSYNC, qd1), origin vs plain loop device")
    mbps_origin, mbps_raw = seq_bytes / seq_origin / 1e6, seq_bytes / seq_raw / 1e6
    print(f"   1 MiB sequential, {seq_mib} MiB: origin {mbps_origin:8.1f} MB/s   raw {mbps_raw:8.1f} MB/s   "
          f"origin/raw {mbps_origin / mbps_raw:.2f}x   (store took {copied / MiB:.1f} MiB of copies)")
    iops_origin, iops_raw = rand_writes / rand_origin, rand_writes / rand_raw
    print(f"   4 KiB random, {rand_writes} writes: origin {iops_origin:8.0f} IOPS   raw {iops_raw:8.0f} IOPS   "
          f"origin/raw {iops_origin / iops_raw:.2f}x")
    print("   (no target: the cost of copy-before-write into the hidden store)")


# -- main ---------------------------------------------------------------------

BENCHES = ("checkpoint", "failover", "throughput")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", action="append", choices=BENCHES, help="run only this benchmark (repeatable)")
    p.add_argument("--cycles", type=int, default=10, help="checkpoint cycles per path (default 10)")
    p.add_argument("--failover-runs", type=int, default=3, help="failovers per data size (default 3)")
    p.add_argument("--small-mib", type=int, default=1, help="data in the store, small case (default 1)")
    p.add_argument("--large-mib", type=int, default=200, help="data in the store, large case (default 200)")
    p.add_argument("--seq-mib", type=int, default=128, help="sequential write volume (default 128)")
    p.add_argument("--rand-writes", type=int, default=2000, help="4 KiB random writes (default 2000)")
    p.add_argument("--seed", type=int, default=1, help="seed of the random offsets")
    args = p.parse_args()

    if not os.path.exists(dm.CONTROL_PATH):
        print("bench: /dev/mapper/control is missing (no device-mapper on this kernel): run it through "
              "the test VM: scripts/vm -- python bench/secondary.py", file=sys.stderr)
        return 2
    missing = [t for t in TOOLS if not shutil.which(t)]
    if missing:
        print(f"bench: missing {', '.join(missing)} (the dmsetup peer needs them: "
              "apt-get install dmsetup coreutils util-linux)", file=sys.stderr)
        return 2
    limit = STORE_BYTES - 8 * MiB  # room for the store's header and exception metadata
    for opt, mib in (("--large-mib", args.large_mib), ("--small-mib", args.small_mib), ("--seq-mib", args.seq_mib)):
        if not 0 < mib * MiB <= limit:
            p.error(f"{opt} must be 1..{limit // MiB} (the stores are {STORE_BYTES // MiB} MiB)")

    selected = args.only or BENCHES
    with dm.Control() as ctl:
        if "checkpoint" in selected:
            bench_checkpoint(ctl, args.cycles)
        if "failover" in selected:
            bench_failover(ctl, args.failover_runs, args.small_mib, args.large_mib)
        if "throughput" in selected:
            bench_throughput(ctl, args.seq_mib, args.rand_writes, args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
