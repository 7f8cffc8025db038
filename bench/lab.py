"""dmrepl between the lab's two VMs against DRBD 8.4 protocol C between the same two VMs, and
the primary's own disk, measured in one lab run (`vagrant/lab bench`; docs/benchmarks.md).

On the primary guest, fio (psync, qd1, O_DIRECT + O_SYNC, as bench/primary.py): 4 KiB random writes
for --seconds, and 1 MiB sequential writes over the first 32 MiB, on three devices in turn:
  raw    the partition dmrepl-drbd of the primary's virtio disk, before DRBD is on it
  dmrepl /dev/dmrepl/lab/primary, replicating to the secondary over the lab's link, each run
         after a checkpoint (a fresh era, an empty hidden store: the steady state under interval
         checkpoints)
  DRBD   8.4 (the guests' kernel module) protocol C over the same link, on the dmrepl-drbd
         partitions of both guests, its activity log warmed by one pass
Also the checkpoint's pause as the primary reports it, and the link's round trip (ping).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "vagrant"))
from guests import NAME, PRIMARY_DEV, Guest  # noqa: E402

DRBD_DISK = "/dev/disk/by-partlabel/dmrepl-drbd"
DRBD_RES, DRBD_MINOR, DRBD_PORT = "dmrepl-bench", 1, 7790
DRBDSETUP = "/usr/lib/drbd/drbdsetup-84"   # the 6.1 kernel's drbd.ko speaks 8.4
ADDRESS = {"primary": "10.78.0.11", "secondary": "10.78.0.12"}
FIO = "fio --name=bench --direct=1 --sync=1 --ioengine=psync --iodepth=1 --output-format=json"
SEQ_BYTES = 32 << 20


def fio(g: Guest, dev: str, kind: str, seconds: int) -> dict:
    if kind == "4k":
        args = f"--rw=randwrite --bs=4k --size=64M --runtime={seconds} --time_based --randrepeat=0"
    else:
        args = f"--rw=write --bs=1M --size={SEQ_BYTES}"
    out = json.loads(g.run(f"{FIO} {args} --filename={dev}", timeout=seconds + 300))
    w = out["jobs"][0]["write"]
    pct = w["clat_ns"].get("percentile", {})
    return {"iops": w["iops"], "mb_s": w["bw_bytes"] / 1e6,
            "p50_ms": pct.get("50.000000", 0) / 1e6, "p99_ms": pct.get("99.000000", 0) / 1e6}


def drbd_up(p: Guest, s: Guest) -> str:
    for g in (p, s):
        me, peer = ADDRESS[g.name], ADDRESS["secondary" if g.name == "primary" else "primary"]
        g.run(f"modprobe drbd && drbdmeta --force {DRBD_MINOR} v08 {DRBD_DISK} internal create-md >/dev/null "
              f"&& {DRBDSETUP} new-resource {DRBD_RES} && {DRBDSETUP} new-minor {DRBD_RES} {DRBD_MINOR} 0 "
              f"&& {DRBDSETUP} attach {DRBD_MINOR} {DRBD_DISK} {DRBD_DISK} internal "
              f"&& {DRBDSETUP} connect {DRBD_RES} ipv4:{me}:{DRBD_PORT} ipv4:{peer}:{DRBD_PORT} --protocol=C")
    deadline = time.monotonic() + 120
    while not re.search(rf"^\s*{DRBD_MINOR}: cs:Connected", p.run("cat /proc/drbd"), re.M):
        if time.monotonic() > deadline:
            raise RuntimeError(f"DRBD did not connect in 120 s: {p.run('cat /proc/drbd')}")
        time.sleep(1)
    # Declared in sync instead of a full initial resync (the bytes do not matter to the figures).
    p.run(f"{DRBDSETUP} new-current-uuid --clear-bitmap {DRBD_MINOR} && {DRBDSETUP} primary {DRBD_MINOR}")
    return f"/dev/drbd{DRBD_MINOR}"


def drbd_down(p: Guest, s: Guest) -> None:
    for g in (p, s):
        g.run(f"{DRBDSETUP} down {DRBD_RES}", check=False)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=int, default=20, help="each 4 KiB random write run (default 20)")
    args = ap.parse_args()
    p, s = Guest("primary"), Guest("secondary")
    p.run(f"dmrepl wait {NAME} --timeout 600", timeout=660)
    rtt = p.run(f"ping -c 20 -i 0.2 -q {ADDRESS['secondary']}").splitlines()[-1]
    print(f"link round trip (ping, 20 packets): {rtt.strip()}", flush=True)
    rows: dict[str, dict[str, dict]] = {}

    rows["raw"] = {k: fio(p, DRBD_DISK, k, args.seconds) for k in ("4k", "1m")}
    pauses = []
    rows["dmrepl"] = {}
    for k in ("4k", "1m"):
        r = json.loads(p.run(f"dmrepl checkpoint {NAME} --json"))
        pauses.append(f"{r['pause_ms']:.1f} ms (the secondary's switch {r['secondary_pause_ms']:.1f} ms)")
        rows["dmrepl"][k] = fio(p, PRIMARY_DEV, k, args.seconds)
    drbd = drbd_up(p, s)
    try:
        fio(p, drbd, "1m", args.seconds)     # warms the activity log
        rows["DRBD 8.4 C"] = {k: fio(p, drbd, k, args.seconds) for k in ("4k", "1m")}
    finally:
        drbd_down(p, s)

    print("\n| figure | dmrepl | DRBD 8.4 C | raw (P's disk) | dmrepl/DRBD |")
    print("|---|---|---|---|---|")
    d, r, raw = rows["dmrepl"], rows["DRBD 8.4 C"], rows["raw"]
    print(f"| 4 KiB random write, qd1 | {d['4k']['iops']:.0f} IOPS | {r['4k']['iops']:.0f} | "
          f"{raw['4k']['iops']:.0f} | {d['4k']['iops'] / r['4k']['iops']:.2f}x |")
    print(f"| 4 KiB latency p50 / p99 | {d['4k']['p50_ms']:.2f} / {d['4k']['p99_ms']:.2f} ms | "
          f"{r['4k']['p50_ms']:.2f} / {r['4k']['p99_ms']:.2f} | {raw['4k']['p50_ms']:.2f} / "
          f"{raw['4k']['p99_ms']:.2f} | {d['4k']['p50_ms'] / r['4k']['p50_ms']:.2f}x (p50) |")
    print(f"| 1 MiB sequential write, 32 MiB | {d['1m']['mb_s']:.1f} MB/s | {r['1m']['mb_s']:.1f} | "
          f"{raw['1m']['mb_s']:.1f} | {d['1m']['mb_s'] / r['1m']['mb_s']:.2f}x |")
    print(f"\ncheckpoint pauses on the primary before the two dmrepl runs: {'; '.join(pauses)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
