"""The cost of the encrypted link: primary writes with the link plain and inside WireGuard, beside DRBD.

In the test VM: DMREPL_BENCH=link scripts/bench   (or scripts/vm -- python bench/link.py)

dmrepl: both daemons in network namespaces joined by a veth (dmrepl.demo's Pair), once with the
plain link and once with [link] encrypt = "wireguard" (the control link and NBD inside the tunnel);
fio qd1 (psync, O_DIRECT + O_SYNC) on /dev/mapper/dmrepl-demo: 4 KiB random writes for a time, one
pass of 1 MiB writes.  DRBD 8.4 protocol C over 127.0.0.1 (bench/primary.py's pair), plain: it has
no encryption of its own.  Each dmrepl variant runs twice, in the order plain, WireGuard, plain,
WireGuard, so that drift of a shared host shows as a spread rather than as a cost.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from primary import disk_file, drbd_pair, fio  # noqa: E402

from dmrepl import poll  # noqa: E402
from dmrepl.demo import Pair  # noqa: E402
from dmrepl.lab import Lab  # noqa: E402
from dmrepl.names import StackNames  # noqa: E402

MiB = 1 << 20
WORKLOADS = (("4k", "4 KiB random write", "IOPS", "iops"), ("1m", "1 MiB sequential write", "MB/s", "mbps"))


def say(msg: str) -> None:
    print(time.strftime("%H:%M:%S ") + msg, file=sys.stderr, flush=True)


def dmrepl_run(disk_bytes: int, wireguard: bool, runtime_s: int) -> dict:
    with contextlib.ExitStack() as es:
        work = es.enter_context(tempfile.TemporaryDirectory(prefix="dmrepl-bench-link-"))
        lab = es.enter_context(Lab("bench-link"))
        for name in ("p.img", "s.img"):         # filled: no write pays tmpfs's first touch
            disk_file(os.path.join(work, name), disk_bytes, filled=True)
        for name, size in (("era.img", 8 * MiB), ("h0.img", disk_bytes + 16 * MiB), ("h1.img", disk_bytes + 16 * MiB)):
            disk_file(os.path.join(work, name), size)
        pair = Pair(work, lab, wireguard=wireguard)
        es.callback(pair.stop)
        pair.start("s")
        poll.wait_for(pair.secondary_ready, "the secondary", timeout=240)
        pair.start("p", "--assume-clean")          # both disks are zeros
        poll.wait_for(pair.status, "replicating", ok=lambda s: s and s["state"] == "replicating", timeout=600)
        top = StackNames("demo").mapper_path_top()
        fio(top, "1m")                              # warm: era blocks marked, nbd connections busy once
        out = {w: fio(top, w, runtime_s) for w, *_ in WORKLOADS}
        say(f"dmrepl {'WireGuard' if wireguard else 'plain'}: "
            + ", ".join(f"{w} {getattr(out[w], attr):.0f} {unit}" for w, _, unit, attr in WORKLOADS))
        return out


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--disk-mib", type=int, default=256)
    p.add_argument("--runtime", type=int, default=20, help="seconds of 4 KiB random writes per run")
    args = p.parse_args()
    disk = args.disk_mib * MiB
    with contextlib.ExitStack() as es:
        work = es.enter_context(tempfile.TemporaryDirectory(prefix="dmrepl-bench-link-drbd-"))
        drbd_dev = es.enter_context(drbd_pair(work, disk))
        drbd = {w: fio(drbd_dev, w, args.runtime) for w, *_ in WORKLOADS}
    say("drbd: " + ", ".join(f"{w} {getattr(drbd[w], attr):.0f} {unit}" for w, _, unit, attr in WORKLOADS))
    runs = {"plain": [], "wireguard": []}
    for kind in ("plain", "wireguard", "plain", "wireguard"):
        runs[kind].append(dmrepl_run(disk, kind == "wireguard", args.runtime))
    print(f"\nthe link plain and inside WireGuard: {args.disk_mib} MiB disks, {os.cpu_count()} vCPU(s), "
          "fio qd1 O_DIRECT+O_SYNC; two runs of each dmrepl variant, interleaved")
    print("| workload | dmrepl plain | dmrepl WireGuard | WireGuard / plain | DRBD 8.4 C (plain) | "
          "WireGuard / DRBD |\n|---|---|---|---|---|---|")
    for w, name, unit, attr in WORKLOADS:
        plain = [getattr(r[w], attr) for r in runs["plain"]]
        wg = [getattr(r[w], attr) for r in runs["wireguard"]]
        d = getattr(drbd[w], attr)
        ratio = (sum(wg) / len(wg)) / (sum(plain) / len(plain))
        print(f"| {name} | {' / '.join(f'{v:.0f}' for v in plain)} {unit} | {' / '.join(f'{v:.0f}' for v in wg)} "
              f"{unit} | {ratio:.2f}x | {d:.0f} {unit} | {(sum(wg) / len(wg)) / d:.2f}x |")
    lat = lambda r: f"{r['4k'].p50_ms:.2f} / {r['4k'].p99_ms:.2f}"   # noqa: E731
    print(f"| 4 KiB latency p50 / p99 ms | {' ; '.join(lat(r) for r in runs['plain'])} | "
          f"{' ; '.join(lat(r) for r in runs['wireguard'])} | | {lat(drbd)} | |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
