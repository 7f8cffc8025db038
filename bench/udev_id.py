"""The udev helper's time per event (udev/dmrepl_id) beside blkid -p, the IMPORT program
60-persistent-storage.rules runs for every disk.

    python bench/udev_id.py [--device /dev/vda] [--configs 1,20,100] [--runs 21]

Runs on the host itself (no root, no device changed: both programs only read): the helper's bound
(50 ms an event, issue 8) is about a real host, where udevd runs it; the test VM's TCG makes every
process start 10-40x slower.  For each count of configs in a directory of its own (one of them
naming DEVICE by its path, the others other disks), prints the median and best time of each
program and the ratio.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

HELPER = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "udev", "dmrepl_id")


def timed(argv: list[str]) -> float:
    t = time.perf_counter()
    subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, timeout=60)
    return time.perf_counter() - t


def write_configs(confdir: str, count: int, device: str) -> None:
    for i in range(count):
        disk = device if i == count - 1 else f"/dev/disk/by-id/wwn-0x5000c500{i:08x}"
        with open(os.path.join(confdir, f"r{i}.toml"), "w") as f:
            f.write(f'[secondary]\ndisk = "{disk}"\nhidden_stores = ["/srv/r{i}/h0", "/srv/r{i}/h1"]\n')


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="/dev/vda")
    p.add_argument("--configs", default="1,20,100")
    p.add_argument("--runs", type=int, default=21)
    args = p.parse_args()
    peer = [timed(["blkid", "-p", "-o", "udev", args.device]) for _ in range(args.runs)]
    print(f"{'configs':>7}  {'dmrepl_id median':>16}  {'best':>6}  {'blkid -p median':>15}  {'best':>6}  ratio")
    for count in (int(c) for c in args.configs.split(",")):
        with tempfile.TemporaryDirectory() as confdir:
            write_configs(confdir, count, args.device)
            out = subprocess.run([HELPER, "--config-dir", confdir, args.device], capture_output=True, text=True,
                                 timeout=60).stdout
            assert out.startswith(f"DMREPL_RESOURCE=r{count - 1}\n"), out
            ours = [timed([HELPER, "--config-dir", confdir, args.device]) for _ in range(args.runs)]
        m, pm = statistics.median(ours), statistics.median(peer)
        print(f"{count:>7}  {m * 1000:>13.1f} ms  {min(ours) * 1000:>3.1f} ms  {pm * 1000:>12.1f} ms  "
              f"{min(peer) * 1000:>3.1f} ms  {m / pm:.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
