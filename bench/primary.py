"""Primary-side benchmark: write throughput and latency through dmrepl's primary path, against peers.

In the test VM: scripts/vm -- python bench/primary.py [--era-kib K ...] [--connections N ...] [--only X]
Loop devices over files in the guest's /tmp (tmpfs-backed), all taken down in finally blocks.

1. fio qd1 (psync, O_DIRECT + O_SYNC), 4 KiB random writes for a time and one pass of 1 MiB writes,
   on a raw loop device, on DRBD 8.4 protocol C (two resources of this kernel over 127.0.0.1:
   DESIGN.md section 5) and on dmrepl: a Secondary whose origin nbdkit exports on 127.0.0.1, attached
   over NBD netlink, under a PrimaryStack (era over mirror(P, nbd)).  A checkpoint precedes each dmrepl
   run (fresh era, empty hidden store: the steady state under interval checkpoints); the same writes
   again ("rewrite") show the path without era commits and copy-before-write.  Raw and DRBD run beside
   each variant, so that another VM on the host shifts all three alike.  Target: dmrepl >= DRBD.
2. The checkpoint pause seen by a writer of back-to-back 4 KiB O_DIRECT|O_DSYNC writes while
   stack.checkpoint() runs 1, 5, 20 times a second, and with none.  The writer is a forked process:
   a thread would wait for the GIL behind the checkpoint's Python code, which a VM never does.
"""

from __future__ import annotations

import argparse
import array
import bisect
import contextlib
import json
import mmap
import multiprocessing
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Iterator, NamedTuple

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dmrepl import poll  # noqa: E402
from dmrepl.config import SecondaryConfig  # noqa: E402
from dmrepl.daemon.export import Export  # noqa: E402
from dmrepl.kernel import blockdev, dm, loop, modules  # noqa: E402
from dmrepl.nbd import netlink  # noqa: E402
from dmrepl.nbd.attach import attach  # noqa: E402
from dmrepl.roles.primary.stack import PrimaryLayout, PrimaryStack  # noqa: E402
from dmrepl.roles.secondary import Secondary  # noqa: E402

KiB, MiB = 1 << 10, 1 << 20
SECTOR_BYTES = 512
HOST = "127.0.0.1"
NBD_PORT = 10899                 # not the daemon's 10809: a bench never meets a real export
DRBD_PORTS = (7788, 7789)
DRBD_RESOURCES = ("dmrepl-bench-a", "dmrepl-bench-b")
DRBD_MINORS = (0, 1)
DRBDSETUP = "/usr/lib/drbd/drbdsetup-84"   # the 6.1 kernel's drbd.ko speaks 8.4, not drbd-utils' 9.x
ERA_META_BYTES = 8 * MiB
PAUSE_STACK = (4, 1024)          # NBD connections, era KiB of the stack the pause is measured on
FIO = ["fio", "--name=bench", "--direct=1", "--sync=1", "--ioengine=psync", "--iodepth=1",
       "--output-format=json"]
TOOLS = {"fio": "fio", "nbdkit": "nbdkit", "drbdmeta": "drbd-utils", DRBDSETUP: "drbd-utils"}


# One fio run: rates, completion latency percentiles, and how many writes it did.
Figures = NamedTuple("Figures", [("iops", float), ("mbps", float), ("p50_ms", float), ("p99_ms", float),
                                 ("ios", int)])


def disk_file(path: str, size_bytes: int, *, filled: bool = False) -> str:
    """A file of size_bytes.  Filled: every page written once, so that no measured write pays
    tmpfs's first-touch page allocation (1 MiB writes to a sparse file ran at 0.24x a rewrite)."""
    with open(path, "wb") as f:
        f.truncate(size_bytes)
        for _ in range(size_bytes // MiB if filled else 0):
            f.write(bytes(MiB))
    return path


def fio(path: str, workload: str, runtime_s: int = 0, ios: int | None = None) -> Figures:
    """4k: random writes for runtime_s, or exactly `ios` of them: fio's default seed repeats the
    offsets, so the second run rewrites what the first wrote.  1m: one pass over the device."""
    if workload == "1m":
        job = ["--rw=write", "--bs=1M"]
    else:
        job = ["--rw=randwrite", "--bs=4k", *([f"--number_ios={ios}"] if ios else
                                              [f"--runtime={runtime_s}", "--time_based"])]
    proc = subprocess.run([*FIO, f"--filename={path}", *job], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"fio {workload} on {path} exited {proc.returncode}: {proc.stderr.strip()}")
    w = json.loads(proc.stdout)["jobs"][0]["write"]
    pct = w["clat_ns"]["percentile"]
    return Figures(iops=w["iops"], mbps=w["bw_bytes"] / 1e6, p50_ms=pct["50.000000"] / 1e6,
                   p99_ms=pct["99.000000"] / 1e6, ios=w["total_ios"])


def pct(values: list[float], q: float) -> float:
    """The q-quantile (0..1) by nearest rank; NaN for no values."""
    return sorted(values)[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


def cpu_probe() -> float:
    """Seconds of a fixed CPU-bound loop: when it grows, another VM is taking the host's cores."""
    t0 = time.perf_counter()
    sum(i * i for i in range(200_000))
    return time.perf_counter() - t0


@contextlib.contextmanager
def loop_over(wd: str, name: str, size_bytes: int, *, filled: bool = False) -> Iterator[str]:
    dev = loop.attach(disk_file(os.path.join(wd, name), size_bytes, filled=filled))
    try:
        yield dev
    finally:
        loop.detach(dev)
        os.unlink(os.path.join(wd, name))   # tmpfs: give the memory back at once


# -- DRBD ---------------------------------------------------------------------------
def drbd_minors() -> dict[int, str]:
    """{minor: its /proc/drbd line}: the kernel's view, also of minors that are not ours."""
    with open("/proc/drbd") as f:
        lines = re.finditer(r"^\s*(\d+): (.*)$", f.read(), re.M)
    return {int(m.group(1)): m.group(2) for m in lines}


def drbdsetup(*args: str, check: bool = True) -> None:
    proc = subprocess.run([DRBDSETUP, *args], capture_output=True, text=True)
    if proc.returncode != 0:
        msg = f"drbdsetup-84 {' '.join(args)} exited {proc.returncode}: {proc.stderr or proc.stdout}".strip()
        if check:
            raise RuntimeError(msg)
        print(f"bench: {msg}", file=sys.stderr)


@contextlib.contextmanager
def drbd_pair(wd: str, disk_bytes: int) -> Iterator[str]:
    """DRBD 8.4 protocol C between two resources of this kernel over loopback; yields /dev/drbd0."""
    if err := modules.load("drbd"):
        raise RuntimeError(f"modprobe drbd: {err}")
    if drbd_minors().keys() & set(DRBD_MINORS):
        raise RuntimeError(f"DRBD minors {DRBD_MINORS} are in use (see /proc/drbd): not ours to touch")
    created: list[str] = []
    with contextlib.ExitStack() as es:
        devs = [es.enter_context(loop_over(wd, f"drbd{i}.img", disk_bytes, filled=True)) for i in (0, 1)]
        for minor, dev in zip(DRBD_MINORS, devs):
            subprocess.run(["drbdmeta", "--force", str(minor), "v08", dev, "internal", "create-md"],
                           check=True, capture_output=True)
        # `down` demotes, disconnects, detaches, deletes minor and resource; before the loops go.
        es.callback(lambda: [drbdsetup("down", res, check=False) for res in reversed(created)])
        addrs = [f"ipv4:{HOST}:{port}" for port in DRBD_PORTS]
        for i, (res, minor, dev) in enumerate(zip(DRBD_RESOURCES, DRBD_MINORS, devs)):
            drbdsetup("new-resource", res)
            created.append(res)
            drbdsetup("new-minor", res, str(minor), "0")
            drbdsetup("attach", str(minor), dev, dev, "internal")
            drbdsetup("connect", res, addrs[i], addrs[1 - i], "--protocol=C")
        poll.wait_for(lambda: [drbd_minors().get(m, "") for m in DRBD_MINORS], "DRBD connected",
                      ok=lambda lines: all("cs:Connected" in line for line in lines))
        # Both disks are all zeros: declare them in sync instead of a full initial resync.
        drbdsetup("new-current-uuid", "--clear-bitmap", str(DRBD_MINORS[0]))
        drbdsetup("primary", str(DRBD_MINORS[0]))
        path = f"/dev/drbd{DRBD_MINORS[0]}"
        # One pass warms the activity log (1237 extents of 4 MiB by default cover the whole
        # disk): DRBD's steady state, without the AL transaction of a first write to an extent.
        fio(path, "1m")
        yield path


# -- dmrepl ---------------------------------------------------------------------------
@contextlib.contextmanager
def secondary_exported(ctl: dm.Control, wd: str, disk_bytes: int, chunk_kib: int) -> Iterator[Secondary]:
    """A Secondary up on tmpfs files, its origin exported by nbdkit on loopback."""
    sd = os.path.join(wd, "secondary")
    os.mkdir(sd)
    # A store holds a copy of every chunk one fio pass touches, plus metadata; sparse (discarded anyway).
    store_bytes = disk_bytes + disk_bytes // 16 + 8 * MiB
    cfg = SecondaryConfig(
        name="bench-s", resource_id="bench-s",
        disk=disk_file(os.path.join(sd, "s.img"), disk_bytes, filled=True),
        hidden_stores=(disk_file(os.path.join(sd, "h0.img"), store_bytes),
                       disk_file(os.path.join(sd, "h1.img"), store_bytes)),
        listen_host=HOST, listen_port=NBD_PORT, chunk_sectors=chunk_kib * KiB // SECTOR_BYTES,
        store_fill_warn=0.75, state_dir=os.path.join(sd, "state"), source="bench/primary.py")
    sec = Secondary(cfg, ctl)
    with contextlib.ExitStack() as es:
        es.callback(shutil.rmtree, sd, ignore_errors=True)
        es.callback(sec.down, force=True)
        sec.up()
        export = Export(sec.origin_device(), HOST, NBD_PORT, cfg.resource_id)
        es.callback(export.stop)
        export.start()
        yield sec


@contextlib.contextmanager
def primary_up(ctl: dm.Control, nl: netlink.NBDNetlink, sec: Secondary, p: str, m: str, *,
               connections: int, era_kib: int, region_kib: int) -> Iterator[PrimaryStack]:
    """The secondary's export attached over NBD and era over mirror(P, nbd) built on it."""
    blockdev.write_at(m, 0, bytes(4096))  # a zeroed superblock: dm-era formats fresh metadata
    stack = PrimaryStack("bench-p", ctl)
    dev = None
    try:
        dev = attach(nl, HOST, NBD_PORT, sec.cfg.resource_id, connections=connections, timeout_s=2,
                     expected_size_bytes=blockdev.size_bytes(p))
        stack.build(PrimaryLayout(disk=p, nbd=dev.path, era_metadata=m,
                                  era_block_sectors=era_kib * KiB // SECTOR_BYTES,
                                  region_sectors=region_kib * KiB // SECTOR_BYTES), [])
        yield stack
    finally:
        stack.teardown()
        if dev is not None:
            with contextlib.suppress(netlink.NBDNetlinkError):
                nl.disconnect(dev.index)
            poll.wait_for(lambda: nl.is_connected(dev.index), f"{dev.path} to disconnect",
                          ok=lambda v: not v)


def checkpoint(stack: PrimaryStack, sec: Secondary) -> tuple[float, float, float]:
    """One two-sided checkpoint; returns seconds: (primary pause, whole Secondary.checkpoint()
    call, the secondary's own switch pause).  The call runs inside the primary's pause."""
    inner = []

    def peer() -> None:
        t0 = time.perf_counter()
        sec_pause = sec.checkpoint()[1]
        inner.extend((time.perf_counter() - t0, sec_pause))

    return stack.checkpoint(peer, lambda: None), *inner


# -- 1. throughput --------------------------------------------------------------------
def bench_variant(stack: PrimaryStack, sec: Secondary, raw: str, drbd: str, runtime_s: int) -> dict:
    """{workload: {path kind: Figures}}, all measured one after the other, and the CPU probe."""
    out: dict = {"cpu": cpu_probe()}
    for workload in ("4k", "1m"):
        checkpoint(stack, sec)
        first = fio(stack.top_path, workload, runtime_s)
        # The same writes again in the same era: no era commit, no copy-before-write.
        again = fio(stack.top_path, workload, runtime_s, first.ios if workload == "4k" else None)
        out[workload] = {"dmrepl": first, "rewrite": again, "raw": fio(raw, workload, runtime_s),
                         "drbd": fio(drbd, workload, runtime_s)}
    return out


def print_throughput(results: list[tuple[str, dict]]) -> None:
    kinds = ("dmrepl", "rewrite", "raw", "drbd")
    fastest = min(r["cpu"] for _, r in results)
    print("| figure | dmrepl after a checkpoint | dmrepl rewrite, same era | raw | DRBD 8.4 C | dmrepl/DRBD "
          "| dmrepl/raw | target: dmrepl >= DRBD |\n|---|---|---|---|---|---|---|---|")
    for label, r in results:
        label += f" (cpu probe {r['cpu'] / fastest:.1f}x)" if r["cpu"] > 1.2 * fastest else ""
        for workload, unit, attr in (("4k", "IOPS", "iops"), ("1m", "MB/s", "mbps")):
            d, again, raw, drbd = (getattr(r[workload][k], attr) for k in kinds)
            name = "4 KiB random write" if workload == "4k" else "1 MiB sequential write"
            print(f"| {name}, {label} | {d:.0f} {unit} | {again:.0f} | {raw:.0f} | {drbd:.0f} | "
                  f"{d / drbd:.2f}x | {d / raw:.2f}x | {'met' if d >= drbd else 'NOT met'} |")
        lat = (f"{r['4k'][k].p50_ms:.2f} / {r['4k'][k].p99_ms:.2f}" for k in kinds)
        print(f"| 4 KiB latency p50 / p99 ms, {label} | {' | '.join(lat)} | | | reported |")


# -- 2. the checkpoint pause seen by a writer ------------------------------------------
def _writer(path: str, disk_bytes: int, duration_s: float, conn) -> None:
    """Back-to-back 4 KiB O_DIRECT|O_DSYNC writes at random offsets; sends (start, end) pairs."""
    fd = os.open(path, os.O_WRONLY | os.O_DIRECT | os.O_DSYNC | os.O_CLOEXEC)
    buf = mmap.mmap(-1, 4 * KiB)   # page-aligned, as O_DIRECT needs
    rng, blocks, times = random.Random(7), disk_bytes // (4 * KiB), array.array("d")
    deadline = time.perf_counter() + duration_s
    while (t0 := time.perf_counter()) < deadline:
        os.pwritev(fd, [buf], rng.randrange(blocks) * 4 * KiB)
        times.extend((t0, time.perf_counter()))
    os.close(fd)
    conn.send_bytes(times.tobytes())


def pause_phase(stack: PrimaryStack, sec: Secondary, disk_bytes: int, duration_s: float,
                rate: float) -> str:
    """Run the writer for duration_s with `rate` checkpoints a second (0: none); a table row."""
    # perf_counter is CLOCK_MONOTONIC, one clock for both processes: their times compare.
    ctx = multiprocessing.get_context("fork")
    ours, theirs = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_writer, args=(stack.top_path, disk_bytes, duration_s, theirs))
    start = time.perf_counter()
    proc.start()
    theirs.close()  # only the child's end stays open: a child that dies is EOFError here, not a hang
    ckpts: list[tuple[float, ...]] = []   # (start, end, primary pause, secondary call, secondary pause)
    try:
        due = start + 0.5  # let the writer get going first
        while rate and due < start + duration_s - 0.2:
            time.sleep(max(0.0, due - time.perf_counter()))
            t0 = time.perf_counter()
            times = checkpoint(stack, sec)
            ckpts.append((t0, time.perf_counter(), *times))
            due = max(due + 1 / rate, time.perf_counter())  # late: the next one at once, no burst
        pairs = array.array("d", ours.recv_bytes())
    finally:
        proc.join(duration_s + 30)
    return phase_row(rate, duration_s, ckpts, [(s, e - s) for s, e in zip(pairs[::2], pairs[1::2])])


def phase_row(rate: float, duration_s: float, ckpts: list[tuple[float, ...]],
              writes: list[tuple[float, float]]) -> str:
    """One table row from the checkpoints and the writes' (start, seconds)."""
    starts = [c[0] for c in ckpts]
    ms = [d * 1000 for _, d in writes]
    # Checkpoints run one after another: only the last to start before a write ended can overlap it.
    hit = [d * 1000 for s, d in writes
           if (i := bisect.bisect_left(starts, s + d) - 1) >= 0 and ckpts[i][1] > s]
    pause, call, switch = ([c[i] * 1000 for c in ckpts] for i in (2, 3, 4))
    cells = [f"{rate:g} / {len(pause) / duration_s:.1f}" if rate else "none"]
    cells += [f"{pct(pause, .5):.1f} / {max(pause):.1f} ms",
              f"{pct(call, .5):.1f} ({pct(switch, .5):.1f}) ms"] if pause else ["-", "-"]
    cells += [f"{len(ms) / duration_s:.0f}", f"{pct(ms, .5):.2f} / {pct(ms, .99):.2f} / {max(ms):.1f} ms",
              f"{len(hit)}, {pct(hit, .5):.1f} / {pct(hit, .99):.1f} / {max(hit):.1f} ms" if hit else "-"]
    return "| " + " | ".join(cells) + " |"


# -- main ---------------------------------------------------------------------------
def check_environment(wd: str, disk_bytes: int) -> str | None:
    if not os.path.exists(dm.CONTROL_PATH):
        return "/dev/mapper/control is missing: run it in the test VM (scripts/vm -- python bench/primary.py)"
    missing = sorted({pkg for tool, pkg in TOOLS.items() if not shutil.which(tool)})
    if missing:
        return f"missing tools: apt-get install {' '.join(missing)}"
    need = 7 * disk_bytes  # raw, 2 DRBD disks, P, S filled; one store full (the other discarded); M
    st = os.statvfs(wd)
    return None if st.f_bavail * st.f_frsize >= need else f"{wd} has < {need // MiB} MiB: lower --disk-mib"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--disk-mib", type=int, default=256, help="size of every disk (default 256)")
    p.add_argument("--era-kib", type=int, action="append", help="era block sizes (default 64 and 1024)")
    p.add_argument("--connections", type=int, action="append", help="NBD connections (default 1 and 4)")
    p.add_argument("--region-kib", type=int, default=512, help="dm-mirror region (default 512)")
    p.add_argument("--chunk-kib", type=int, default=4, help="secondary's COW chunk (default 4)")
    p.add_argument("--runtime", type=int, default=5, help="seconds of each 4 KiB fio run (default 5)")
    p.add_argument("--pause-seconds", type=float, default=8.0, help="writer time per pause phase")
    p.add_argument("--pause-rates", default="1,5,20", help="checkpoints a second (default 1,5,20)")
    p.add_argument("--only", choices=("throughput", "pause"), help="run one of the two parts")
    return p.parse_args()


def run_throughput(es: contextlib.ExitStack, primary, sec: Secondary, wd: str, args) -> None:
    raw = es.enter_context(loop_over(wd, "raw.img", args.disk_mib * MiB, filled=True))
    drbd = es.enter_context(drbd_pair(wd, args.disk_mib * MiB))
    results = []
    for era_kib in args.era_kib or [64, 1024]:
        for conns in args.connections or [1, 4]:
            with primary(conns, era_kib) as stack:
                results.append((f"era {era_kib} KiB, {conns} conn",
                                bench_variant(stack, sec, raw, drbd, args.runtime)))
    print(f"\n1. fio qd1 O_DIRECT+O_SYNC: 4 KiB random {args.runtime} s, 1 MiB sequential one pass; "
          "raw and DRBD measured beside each dmrepl variant")
    print_throughput(results)
    met = [label for label, r in results if all(getattr(r[w]["dmrepl"], a) >= getattr(r[w]["drbd"], a)
                                                for w, a in (("4k", "iops"), ("1m", "mbps")))]
    print(f"targets (4 KiB IOPS and 1 MiB MB/s >= DRBD): {'met by ' + '; '.join(met) if met else 'NOT met'}")


def run_pause(primary, sec: Secondary, args) -> None:
    rates = [0.0, *(float(r) for r in args.pause_rates.split(",") if r)]
    with primary(*PAUSE_STACK) as stack:
        rows = [pause_phase(stack, sec, args.disk_mib * MiB, args.pause_seconds, r) for r in rates]
    print(f"\n2. checkpoint pause seen by a 4 KiB O_DIRECT|O_DSYNC writer, {args.pause_seconds:g} s a "
          f"phase, {PAUSE_STACK[0]} conn, era {PAUSE_STACK[1]} KiB (the config's default era block)")
    print("| checkpoints/s asked / done | pause p50 / max | in it: Secondary.checkpoint() call p50 (its "
          "switch p50) | writes/s | write p50 / p99 / max | writes overlapping a checkpoint: n, p50 / p99 "
          "/ max |")
    print("|---|---|---|---|---|---|", *rows, sep="\n")


def main() -> int:
    args = parse_args()
    with contextlib.ExitStack() as es:
        wd = es.enter_context(tempfile.TemporaryDirectory(prefix="dmrepl-bench-primary-"))
        if problem := check_environment(wd, args.disk_mib * MiB):
            print(f"bench: {problem}", file=sys.stderr)
            return 2
        ctl = es.enter_context(dm.Control())
        nl = es.enter_context(netlink.NBDNetlink())
        sec = es.enter_context(secondary_exported(ctl, wd, args.disk_mib * MiB, args.chunk_kib))
        pdisk = es.enter_context(loop_over(wd, "p.img", args.disk_mib * MiB, filled=True))
        meta = es.enter_context(loop_over(wd, "m.img", ERA_META_BYTES))

        def primary(conns: int, era_kib: int):
            return primary_up(ctl, nl, sec, pdisk, meta, connections=conns, era_kib=era_kib,
                              region_kib=args.region_kib)

        print(f"primary writes: {os.cpu_count()} vCPU(s), disks {args.disk_mib} MiB on tmpfs loops, "
              f"secondary chunk {args.chunk_kib} KiB (persistent store), mirror region "
              f"{args.region_kib} KiB, NBD and DRBD over {HOST}")
        if args.only != "pause":
            run_throughput(es, primary, sec, wd, args)
        if args.only != "throughput":
            run_pause(primary, sec, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
