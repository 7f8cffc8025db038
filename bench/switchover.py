"""Planned switchover: how long the consumer waits; dmrepl's one command against the same moves
made by hand (the OCF agent's demote + promote) and against DRBD.

In the test VM: DMREPL_BENCH=switchover scripts/bench

Two "hosts" in one VM (tests/kernel/daemons_lab.py: namespaces p and s, both roles' sections,
32 MiB disks), the consumer stopped before each move (as every method requires):
  switchover  `dmrepl switchover NAME` on the primary, both ways, ROUNDS times
  by hand     the primary: `dmrepl checkpoint`, `down`, `resolve --discard-my-data`, `up`
              (secondary); the other host: `failover`, `down`, `up` (primary) -- the Pacemaker
              agent's demote on one host, then its promote on the other
  DRBD 8.4    `drbdsetup secondary` on one minor, `drbdsetup primary` on the other (protocol C
              over loopback, bench/primary.py's pair)
Printed for each: the consumer's pause (from the first command until the new primary's device
can be opened) and, for dmrepl, the time until the new primary replicates to the old one.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "tests", "kernel"))

import daemons_lab as dl  # noqa: E402
from primary import DRBD_MINORS, drbd_pair, drbdsetup  # noqa: E402

from dmrepl import poll  # noqa: E402
from dmrepl.daemon.export import port_accepts  # noqa: E402
from dmrepl.lab import Lab  # noqa: E402
from dmrepl.names import StackNames  # noqa: E402

ROUNDS = 2          # each way
TOPS = {"p": StackNames(dl.NAME).mapper_path_top(), "s": StackNames(dl.B_NAME).mapper_path_top()}
OTHER = {"p": "s", "s": "p"}


def say(msg: str) -> None:
    print(time.strftime("%H:%M:%S ") + msg, file=sys.stderr, flush=True)


def start(hosts: dl.Hosts, host: str, *extra: str) -> None:
    log = open(os.path.join(hosts.logs, f"{host}.log"), "ab")
    argv = [sys.executable, "-m", "dmrepl.cli", "up", dl.name_of(host), "--config", hosts.config(host), *extra]
    hosts.procs[host] = subprocess.Popen(argv, stdout=log, stderr=log)
    log.close()


def listening(hosts: dl.Hosts, host: str) -> None:
    def ready():
        with hosts.lab.inside(host):
            return port_accepts(hosts.lab.hosts[host].address, dl.LINK_PORT)
    poll.wait_for(ready, f"{host}'s control link", timeout=dl.START_TIMEOUT, interval=0.01)


def replicating(hosts: dl.Hosts, host: str) -> None:
    poll.wait_for(lambda: dl.status_of(hosts, host), f"{host} to replicate",
                  ok=lambda s: s and s["state"] == "replicating", timeout=dl.START_TIMEOUT, interval=0.05)


def device(host: str) -> None:
    poll.wait_for(lambda: os.path.exists(TOPS[host]), f"{TOPS[host]}", timeout=dl.START_TIMEOUT, interval=0.01)


def ok(r: subprocess.CompletedProcess) -> str:
    if r.returncode != 0:
        raise RuntimeError(f"{r.args}: exit {r.returncode}: {r.stderr}")
    return r.stdout


def switchover(hosts: dl.Hosts, host: str) -> tuple[float, float]:
    """`dmrepl switchover` on `host`, the primary: (pause, until replicating)."""
    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "dmrepl.cli", "switchover", dl.name_of(host), "--config",
                             hosts.config(host), "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    device(OTHER[host])
    pause = time.monotonic() - t0
    out, err = proc.communicate(timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"switchover on {host}: {err}")
    json.loads(out)
    return pause, time.monotonic() - t0


def by_hand(hosts: dl.Hosts, host: str) -> tuple[float, float]:
    """The agent's demote on `host`, then its promote on the other: (pause, until replicating)."""
    other = OTHER[host]
    t0 = time.monotonic()
    ok(dl.cli_of(hosts, host, "checkpoint"))
    ok(dl.cli_of(hosts, host, "down"))
    hosts.procs[host].wait(timeout=60)
    ok(dl.cli_of(hosts, host, "resolve", "--discard-my-data"))
    start(hosts, host)
    listening(hosts, host)
    ok(dl.cli_of(hosts, other, "failover"))
    ok(dl.cli_of(hosts, other, "down"))
    hosts.procs[other].wait(timeout=60)
    start(hosts, other)
    device(other)
    pause = time.monotonic() - t0
    replicating(hosts, other)
    return pause, time.monotonic() - t0


def drbd_rounds() -> list[float]:
    pauses = []
    with tempfile.TemporaryDirectory(prefix="dmrepl-bench-") as wd:
        with drbd_pair(wd, 32 << 20):
            primary = 0
            for _ in range(2 * ROUNDS):
                t0 = time.monotonic()
                drbdsetup("secondary", str(DRBD_MINORS[primary]))
                drbdsetup("primary", str(DRBD_MINORS[1 - primary]))
                pauses.append(time.monotonic() - t0)
                primary = 1 - primary
    return pauses


def dmrepl_rounds() -> dict[str, list[tuple[float, float]]]:
    results: dict[str, list[tuple[float, float]]] = {"switchover": [], "by hand": []}
    with tempfile.TemporaryDirectory(prefix="dmrepl-bench-") as wd, Lab("bench-switch") as lab:
        logs = os.path.join(wd, "logs")
        os.makedirs(logs)
        hosts = dl.Hosts(pathlib.Path(wd), lab, logs)
        dl.both_roles(hosts)
        for host in ("p", "s"):
            path = hosts.config(host)
            text = open(path).read()
            with open(path, "w") as f:
                f.write(text.replace("[secondary]\n", f'[secondary]\nnetns = "{lab.hosts[host].netns}"\n', 1))
        dl.image(pathlib.Path(wd) / "s.img", dl.DISK, b"\x11")
        try:
            start(hosts, "s")
            listening(hosts, "s")
            start(hosts, "p", "--assume-clean")
            replicating(hosts, "p")
            primary = "p"
            for method, run in (("switchover", switchover), ("by hand", by_hand)):
                for _ in range(2 * ROUNDS):
                    pause, total = run(hosts, primary)
                    say(f"{method} {primary} -> {OTHER[primary]}: pause {pause:.2f} s, replicating after {total:.2f} s")
                    results[method].append((pause, total))
                    primary = OTHER[primary]
        finally:
            for host in ("p", "s"):
                dl.cli_of(hosts, host, "down", "--force")
            for proc in hosts.procs.values():
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=30)
    return results


def main() -> int:
    results = dmrepl_rounds()
    drbd = drbd_rounds()
    say(f"drbd: pauses {', '.join(f'{p * 1000:.0f} ms' for p in drbd)}")
    sw = statistics.median(p for p, _t in results["switchover"])
    print(f"\nplanned switchover, consumer stopped, 32 MiB disks, {2 * ROUNDS} moves each (medians):")
    print(f"{'method':<34} {'consumer pause':>15} {'replicating after':>18} {'pause / switchover':>19}")
    for method, rows in results.items():
        pause = statistics.median(p for p, _t in rows)
        total = statistics.median(t for _p, t in rows)
        print(f"{'dmrepl ' + method:<34} {pause:>13.2f} s {total:>16.2f} s {pause / sw:>18.2f}x")
    d = statistics.median(drbd)
    print(f"{'DRBD 8.4 secondary + primary':<34} {d:>13.3f} s {'(no resync)':>18} {d / sw:>18.3f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
