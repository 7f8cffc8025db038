"""Resync benchmark: a secondary cut off while the primary writes, then back; dmrepl against DRBD.

In the test VM: DMREPL_BENCH=resync scripts/bench   (or scripts/vm -- python bench/resync.py)

For each pattern, written while the secondary is away:
  spread   64 MiB in 1 MiB writes at random places of the disk
  scatter  8 MiB in 4 KiB writes at random places of the disk
dmrepl: both daemons in network namespaces (dmrepl.demo's Pair), the link cut with the veth down,
the writes through /dev/mapper/dmrepl-NAME, the link back up: time from the link's return to
"replicating" (reconnect attempt every second, comparison, the kernel's copy, the joining
checkpoint) and the bytes the resync sent (`status`: copied pieces + digests).
DRBD 8.4 protocol C over 127.0.0.1 (bench/primary.py's pair): `disconnect`, the same writes on
/dev/drbd0, `connect`; time to UpToDate/UpToDate and the bytes it sent (/proc/drbd ns: delta).
Last, for both, the stall a 4 KiB writer sees under 100 % loss of the secondary's packets and when
the secondary's end closes at once (dmrepl: kill -9 of its daemon; DRBD: `disconnect --force` on
the peer).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from primary import DRBD_MINORS, DRBD_PORTS, DRBD_RESOURCES, HOST, drbd_minors, drbd_pair, drbdsetup  # noqa: E402

from dmrepl import poll  # noqa: E402
from dmrepl.demo import Pair  # noqa: E402
from dmrepl.kernel import blockdev  # noqa: E402
from dmrepl.lab import Lab  # noqa: E402
from dmrepl.names import StackNames  # noqa: E402

KiB, MiB = 1 << 10, 1 << 20
PATTERNS = {"spread": (64, MiB), "scatter": (2048, 4 * KiB)}   # (writes, bytes each)


def say(msg: str) -> None:
    print(time.strftime("%H:%M:%S ") + msg, file=sys.stderr, flush=True)


def offsets(disk_bytes: int, n: int, size: int, seed: int) -> list[int]:
    rnd = random.Random(seed)
    return sorted(rnd.sample(range(disk_bytes // size), n))


def write_pattern(path: str, disk_bytes: int, pattern: str, seed: int) -> int:
    n, size = PATTERNS[pattern]
    disk_bytes = min(disk_bytes, blockdev.size_bytes(path))   # DRBD's internal metadata takes the end
    for i in offsets(disk_bytes, n, size, seed):
        blockdev.write_at(path, i * size, os.urandom(size))
    blockdev.flush(path)
    return n * size


# -- dmrepl ---------------------------------------------------------------------------------

def dmrepl_pair(es: contextlib.ExitStack, work: str, disk_bytes: int) -> Pair:
    lab = es.enter_context(Lab("bench-resync"))
    for name, size in (("p.img", disk_bytes), ("s.img", disk_bytes), ("era.img", 8 * MiB),
                       ("h0.img", disk_bytes // 2), ("h1.img", disk_bytes // 2)):
        with open(os.path.join(work, name), "wb") as f:
            f.truncate(size)
    pair = Pair(work, lab)
    cfg = open(pair.config("p")).read().replace(
        "[[primary.secondaries]]", "reconnect_interval_s = 1\nheartbeat_interval_s = 0.5\nheartbeat_misses = 4\n"
        "[[primary.secondaries]]")
    cfg = cfg.replace("heartbeat_misses = 10\n", "")
    with open(pair.config("p"), "w") as f:
        f.write(cfg)
    es.callback(pair.stop)
    pair.start("s")
    poll.wait_for(pair.secondary_ready, "the secondary", timeout=240)
    pair.start("p", "--assume-clean")          # both disks are zeros
    return pair


def resyncs(s: dict) -> int:
    return sum(1 for h in s["history"] if h["event"] == "resynced")


def dmrepl_round(pair: Pair, top: str, disk_bytes: int, pattern: str, seed: int) -> dict:
    before = resyncs(pair.status())
    pair.lab.link_down("s")
    poll.wait_for(pair.status, "degraded", ok=lambda s: s["state"] == "degraded", timeout=60)
    written = write_pattern(top, disk_bytes, pattern, seed)
    say(f"dmrepl {pattern}: {written >> 20} MiB written while degraded")
    t0 = time.monotonic()
    pair.lab.link_up("s")
    s = poll.wait_for(pair.status, "the resync", ok=lambda s: s["state"] == "replicating" and resyncs(s) > before,
                      timeout=600)
    r = s["last_resync"]
    say(f"dmrepl {pattern}: in sync after {time.monotonic() - t0:.1f} s")
    return {"written": written, "seconds": time.monotonic() - t0, "sent": r["sent_bytes"],
            "copied": r["copy_bytes"], "digests": r["digest_bytes"], "compared": r["candidate_bytes"],
            "compare_s": r["compare_seconds"], "copy_s": r["copy_seconds"]}


def stall(top: str, fault, watch_s: float = 8.0, span: int = 1024) -> float:
    """The longest 4 KiB write that was in flight at or after `fault()` (a writer hammering
    `span` blocks, watched for `watch_s` after the fault; a write still hung then counts until
    the watch's end, so a hang reads as at least `watch_s`)."""
    lat: list[tuple[float, float]] = []
    inflight = [0.0]
    stop = threading.Event()

    def writer():
        while not stop.is_set():
            inflight[0] = t = time.monotonic()
            blockdev.write_at(top, random.randrange(span) * 4 * KiB, os.urandom(4 * KiB))
            lat.append((t, time.monotonic() - t))
            inflight[0] = 0.0

    th = threading.Thread(target=writer, daemon=True)
    th.start()
    time.sleep(1)
    t_fault = time.monotonic()
    fault()
    time.sleep(watch_s)
    stop.set()
    end = time.monotonic()
    hung = end - inflight[0] if inflight[0] else 0.0
    th.join(timeout=120)
    return max([d for t, d in lat if t + d >= t_fault] + [hung])


def dmrepl_stalls(pair: Pair, top: str) -> dict:
    """The writer's stall under 100 % loss from the secondary, then (after it resynced) under a
    kill -9 of the secondary's daemon."""
    out = {"loss": stall(top, lambda: pair.lab.loss("s", 100))}
    before = resyncs(pair.status())
    pair.lab.loss("s", 0)
    poll.wait_for(pair.status, "the resync after the loss",
                  ok=lambda s: s["state"] == "replicating" and resyncs(s) > before, timeout=600)
    out["kill"] = stall(top, lambda: os.kill(pair.procs["s"].pid, signal.SIGKILL))
    return out


# -- DRBD -----------------------------------------------------------------------------------

def drbd_sent_kib(minor: int) -> int:
    """The minor's `ns:` (KiB sent on the network, resync included): on the line after its `cs:` line."""
    with open("/proc/drbd") as f:
        text = f.read()
    m = re.search(rf"^\s*{minor}: cs:.*\n\s*ns:(\d+)", text, re.M)
    if m is None:
        raise RuntimeError(f"no ns: counter for minor {minor} in /proc/drbd:\n{text}")
    return int(m.group(1))


HELPER = "/sys/module/drbd/parameters/usermode_helper"


@contextlib.contextmanager
def drbd_without_helpers():
    """DRBD runs `/sbin/drbdadm before-resync-source` (its usermode helper) before a resync and
    drops the connection when that fails -- as it does for resources made with drbdsetup alone,
    without /etc/drbd.conf (docs/kernel-notes.md).  /bin/true while the benchmark runs."""
    with open(HELPER) as f:
        old = f.read().strip()
    with open(HELPER, "w") as f:
        f.write("/bin/true")
    try:
        yield
    finally:
        with open(HELPER, "w") as f:
            f.write(old)


def drbd_in_sync(minor: int, what: str = "DRBD in sync", timeout: float = 300) -> None:
    """Until the minor's /proc/drbd line says Connected and UpToDate on both sides."""
    poll.wait_for(lambda: drbd_minors()[minor], what, timeout=timeout, interval=0.05,
                  ok=lambda line: "cs:Connected" in line and "ds:UpToDate/UpToDate" in line)


def drbd_round(path: str, disk_bytes: int, pattern: str, seed: int) -> dict:
    res, minor = DRBD_RESOURCES[0], DRBD_MINORS[0]
    here, there = f"ipv4:{HOST}:{DRBD_PORTS[0]}", f"ipv4:{HOST}:{DRBD_PORTS[1]}"
    drbdsetup("disconnect", here, there)         # 8.4: a connection is named by its two endpoints
    written = write_pattern(path, disk_bytes, pattern, seed)
    say(f"drbd {pattern}: {written >> 20} MiB written while disconnected; {drbd_minors()[minor].strip()}")
    t0 = time.monotonic()
    drbdsetup("connect", res, here, there, "--protocol=C")
    drbd_in_sync(minor)
    # DRBD zeroes its counters when a connection is established: ns: now counts the resync alone
    # (seen as negative deltas in the first run), so the value read now is what the resync sent.
    return {"written": written, "seconds": time.monotonic() - t0, "sent": drbd_sent_kib(minor) * KiB}


def drbd_loss(on: bool) -> None:
    """100 % loss of DRBD's traffic on loopback (both ports, both directions): a prio qdisc on lo
    whose third band drops everything, fed by u32 filters on DRBD's ports; off removes it."""
    tc = lambda *a: subprocess.run(["tc", *a], check=True, capture_output=True)   # noqa: E731
    if not on:
        tc("qdisc", "del", "dev", "lo", "root")
        return
    tc("qdisc", "add", "dev", "lo", "root", "handle", "1:", "prio")
    tc("qdisc", "add", "dev", "lo", "parent", "1:3", "handle", "30:", "netem", "loss", "100%")
    for port in DRBD_PORTS:
        for field in ("sport", "dport"):
            tc("filter", "add", "dev", "lo", "parent", "1:", "protocol", "ip", "prio", "1", "u32",
               "match", "ip", field, str(port), "0xffff", "flowid", "1:3")


def drbd_stalls(path: str) -> dict:
    """DRBD's writer stall under 100 % loss of its traffic, then (connected and in sync again)
    when the peer's end is closed at once (`disconnect --force` on the peer: what a dead process's
    sockets look like to the primary; the peer is a kernel thread, there is no process to kill)."""
    res, minor = DRBD_RESOURCES, DRBD_MINORS[0]
    addrs = [f"ipv4:{HOST}:{port}" for port in DRBD_PORTS]
    out = {"loss": stall(path, lambda: drbd_loss(True), watch_s=50)}
    drbd_loss(False)
    say(f"drbd after the loss: {drbd_minors()[minor].strip()}")
    for i, m in enumerate(DRBD_MINORS):     # DRBD reconnects by itself unless it went StandAlone
        if "StandAlone" in drbd_minors()[m]:
            drbdsetup("connect", res[i], addrs[i], addrs[1 - i], "--protocol=C")
    drbd_in_sync(minor, "DRBD in sync after the loss")
    out["kill"] = stall(path, lambda: drbdsetup("disconnect", "--force", addrs[1], addrs[0]))
    return out


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--disk-mib", type=int, default=256)
    args = p.parse_args()
    disk = args.disk_mib * MiB
    rows = []
    with contextlib.ExitStack() as es:
        work = es.enter_context(tempfile.TemporaryDirectory(prefix="dmrepl-bench-resync-"))
        drbd = es.enter_context(drbd_pair(work, disk))
        es.enter_context(drbd_without_helpers())
        for seed, pattern in enumerate(PATTERNS):
            rows.append((pattern, "drbd", drbd_round(drbd, disk, pattern, seed)))
        stalls = {"drbd": drbd_stalls(drbd)}
        es.close()
    with contextlib.ExitStack() as es:
        work = es.enter_context(tempfile.TemporaryDirectory(prefix="dmrepl-bench-resync-"))
        pair = dmrepl_pair(es, work, disk)
        poll.wait_for(pair.status, "replicating", ok=lambda s: s and s["state"] == "replicating", timeout=600)
        top = StackNames("demo").mapper_path_top()
        for seed, pattern in enumerate(PATTERNS):
            rows.append((pattern, "dmrepl", dmrepl_round(pair, top, disk, pattern, seed)))
        stalls["dmrepl"] = dmrepl_stalls(pair, top)
    print(f"\nresync after a disconnection: {args.disk_mib} MiB disks, {os.cpu_count()} vCPU(s); "
          "time from reconnection to in sync, bytes sent")
    print("| pattern | peer | written | time to in sync | sent | sent / written |")
    print("|---|---|---|---|---|---|")
    for pattern, peer, r in rows:
        print(f"| {pattern} | {peer} | {r['written'] / MiB:.1f} MiB | {r['seconds']:.2f} s | "
              f"{r['sent'] / MiB:.2f} MiB | {r['sent'] / r['written']:.3f}x |")
    for pattern, peer, r in rows:
        if peer == "dmrepl":
            print(f"dmrepl {pattern}: {r['compared'] / MiB:.1f} MiB compared, {r['copied'] / MiB:.2f} MiB copied, "
                  f"{r['digests'] / KiB:.0f} KiB of digests; comparing {r['compare_s']:.1f} s, copying {r['copy_s']:.1f} s")
    print("\nlongest 4 KiB write from the secondary's loss on (writer on the primary's device)")
    print("| fault | dmrepl | DRBD | dmrepl / DRBD |")
    print("|---|---|---|---|")
    for fault, label in (("kill", "peer's end closed (dmrepl: kill -9; DRBD: disconnect --force)"),
                         ("loss", "100 % packet loss")):
        d, b = stalls["dmrepl"][fault], stalls["drbd"][fault]
        print(f"| {label} | {d * 1000:.0f} ms | {b * 1000:.0f} ms | {d / b if b else float('inf'):.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
