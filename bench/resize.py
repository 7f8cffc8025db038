"""Online grow: dmrepl's `resize` against DRBD 8.4's `resize`, a writer on the device meanwhile.

In the test VM: DMREPL_BENCH=resize scripts/bench

Both grow a replicated device from 32 to 64 MiB after its two backing files grew (truncate, so
the new range is zeros on both hosts), while a 4 KiB writer (5 ms apart) writes in the old range:
  dmrepl  two "hosts" in one VM (tests/kernel/daemons_lab.py); `dmrepl resize`, which waits for
          the resync that compares the new range
  DRBD    8.4 protocol C over loopback (bench/primary.py's pair, internal metadata); `losetup -c`
          on both backing loops, `drbdsetup resize`, until both sides are UpToDate (DRBD syncs
          the new area)
Printed: the time to replicating again, the writer's longest write during it, and what was
copied (dmrepl: the resync's bytes compared and copied; DRBD: the bytes it sent).
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "tests", "kernel"))

import daemons_lab as dl  # noqa: E402
from primary import DRBD_MINORS, drbd_pair, drbdsetup  # noqa: E402
from resync import drbd_in_sync, drbd_sent_kib, drbd_without_helpers  # noqa: E402

from dmrepl.kernel import loop  # noqa: E402
from dmrepl.lab import Lab  # noqa: E402

MiB = 1 << 20
OLD, NEW = 32 * MiB, 64 * MiB
BLOCKS = list(range(0, 256))        # the writer's 4 KiB blocks: the first MiB, in the old range


def say(msg: str) -> None:
    print(time.strftime("%H:%M:%S ") + msg, file=sys.stderr, flush=True)


def dmrepl_round() -> dict:
    with tempfile.TemporaryDirectory(prefix="dmrepl-bench-") as wd, Lab("bench-resize") as lab:
        logs = os.path.join(wd, "logs")
        os.makedirs(logs)
        hosts = dl.Hosts(pathlib.Path(wd), lab, logs)
        dl.image(pathlib.Path(wd) / "s.img", dl.DISK, b"\x11")
        try:
            hosts.start_secondary()
            hosts.start_primary("--assume-clean")
            for name in ("p.img", "s.img"):
                os.truncate(os.path.join(wd, name), NEW)
            with dl.Writer(BLOCKS, pause_s=0.005) as w:
                time.sleep(1)
                t0 = time.monotonic()
                r = hosts.cli("p", "resize", "--json", timeout=600)
                seconds = time.monotonic() - t0
                time.sleep(1)
            if r.returncode != 0:
                raise RuntimeError(f"dmrepl resize: {r.stderr}")
            out = json.loads(r.stdout)
            during = [s for start, s in w.latencies if t0 <= start <= t0 + seconds]
            res = out["last_resync"]
            return {"seconds": seconds, "longest_write": max(during), "writes": len(during),
                    "compared": res["candidate_bytes"], "copied": res["copy_bytes"], "sent": res["sent_bytes"]}
        finally:
            hosts.stop()


def drbd_round() -> dict:
    with tempfile.TemporaryDirectory(prefix="dmrepl-bench-") as wd, drbd_pair(wd, OLD) as path, \
            drbd_without_helpers():             # after the pair: it loads the module
        loops = [dev for dev, file in loop.list_attached().items() if file.startswith(wd)]
        with dl.Writer(BLOCKS, pause_s=0.005, path=path) as w:
            time.sleep(1)
            sent0 = drbd_sent_kib(DRBD_MINORS[0])
            t0 = time.monotonic()
            for dev in loops:
                os.truncate(loop.backing_file(dev), NEW)
                subprocess.run(["losetup", "-c", dev], check=True)
            drbdsetup("resize", str(DRBD_MINORS[0]))
            drbd_in_sync(DRBD_MINORS[0], "DRBD in sync after its resize", timeout=600)
            seconds = time.monotonic() - t0
            sent = (drbd_sent_kib(DRBD_MINORS[0]) - sent0) * 1024
            time.sleep(1)
        during = [s for start, s in w.latencies if t0 <= start <= t0 + seconds]
        with open(f"/sys/block/drbd{DRBD_MINORS[0]}/size") as f:
            size = int(f.read()) * 512
        return {"seconds": seconds, "longest_write": max(during), "writes": len(during),
                "sent": max(0, sent - len(during) * 4096), "size": size}     # the writer's own writes left out


def main() -> int:
    d = dmrepl_round()
    say(f"dmrepl: {d}")
    b = drbd_round()
    say(f"drbd: {b}")
    print(f"\nonline grow {OLD >> 20} -> {NEW >> 20} MiB (new range zeros on both sides), a 4 KiB writer meanwhile:")
    print(f"{'':<10} {'to in sync':>11} {'longest write':>14} {'bytes sent':>11}")
    print(f"{'dmrepl':<10} {d['seconds']:>9.2f} s {d['longest_write']:>12.3f} s {d['sent'] >> 10:>8} KiB"
          f"   (compared {d['compared'] >> 20} MiB, copied {d['copied'] >> 10} KiB)")
    print(f"{'DRBD 8.4':<10} {b['seconds']:>9.2f} s {b['longest_write']:>12.3f} s {b['sent'] >> 10:>8} KiB"
          f"   (device {b['size'] >> 20} MiB after)")
    print(f"ratio dmrepl / DRBD: time {d['seconds'] / b['seconds']:.2f}x, longest write "
          f"{d['longest_write'] / b['longest_write']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
