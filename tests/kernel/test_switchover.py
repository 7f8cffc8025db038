"""`dmrepl switchover NAME`: the primary's role moves to the secondary and back, no write lost and
nothing resynced; the refusals change nothing (kernel tier, e2e).

Two "hosts" in one VM (daemons_lab: namespaces p and s, resources r5 and r5b with both roles'
sections).  Each daemon starts in the initial namespace and enters its config's `netns` itself
(each [secondary] gets one here, as in production: a switchover's new primary needs the initial
namespace's nbd netlink family).  Each process stays the same across the switchover (execv):
the test holds both Popen objects throughout.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import pytest
from daemons_lab import (
    B_NAME,
    LINK_PORT,
    NAME,
    START_TIMEOUT,
    TOP,
    MiB,
    both_roles,
    cli_of,
    image,
    name_of,
    status_of,
)

from dmrepl import poll
from dmrepl.daemon.export import port_accepts
from dmrepl.kernel import blockdev
from dmrepl.names import StackNames
from dmrepl.state import StateStore

pytestmark = [pytest.mark.kernel, pytest.mark.timeout(900, method="signal")]

DISK = 32 * MiB
A_ACTIVE = StackNames(NAME).mapper_path("active")
B_TOP, B_ACTIVE = StackNames(B_NAME).mapper_path_top(), StackNames(B_NAME).mapper_path("active")


def _pattern(tag: bytes, size: int) -> bytes:
    return b"".join(tag + i.to_bytes(4, "big") + b"." * (4096 - len(tag) - 4) for i in range(size // 4096))


def _state(hosts, host: str):
    return StateStore(str(hosts.dir / f"{host}-state" / name_of(host))).load()


def _start(hosts, host: str, *extra: str) -> subprocess.Popen:
    log = open(os.path.join(hosts.logs, f"{host}.log"), "ab")
    argv = [sys.executable, "-m", "dmrepl.cli", "up", name_of(host), "--config", hosts.config(host), *extra]
    hosts.procs[host] = subprocess.Popen(argv, stdout=log, stderr=log)
    log.close()
    return hosts.procs[host]


def _listening(hosts, host: str) -> None:
    def ready():
        assert hosts.procs[host].poll() is None, hosts.log(host)
        with hosts.lab.inside(host):
            return port_accepts(hosts.lab.hosts[host].address, LINK_PORT)
    poll.wait_for(ready, f"{host}'s control link", timeout=START_TIMEOUT)


def _replicating(hosts, host: str) -> dict:
    return poll.wait_for(lambda: status_of(hosts, host), f"{host} to replicate",
                         ok=lambda s: s and s["state"] == "replicating", timeout=START_TIMEOUT)


def _switchover(hosts, host: str, new_top: str) -> tuple[dict, float, float]:
    """`dmrepl switchover` on `host` (it waits for the new primary to replicate back); returns its
    report, the seconds until the new primary's device was there (the consumer's pause) and the
    seconds in all."""
    appeared: list[float] = []
    done = threading.Event()

    def watch():
        while not done.is_set():
            if os.path.exists(new_top):
                appeared.append(time.monotonic())
                return
            time.sleep(0.01)

    watcher = threading.Thread(target=watch, daemon=True)
    t0 = time.monotonic()
    watcher.start()
    r = cli_of(hosts, host, "switchover", "--json")
    done.set()
    watcher.join()
    assert r.returncode == 0, (r.stdout, r.stderr, hosts.log("p")[-3000:], hosts.log("s")[-3000:])
    return json.loads(r.stdout), appeared[0] - t0, time.monotonic() - t0


def test_switchover_both_ways_no_write_lost_nothing_resynced_and_the_refusals(hosts):
    both_roles(hosts)
    for host in ("p", "s"):
        path = hosts.config(host)
        with open(path) as f:
            text = f.read()
        with open(path, "w") as f:
            f.write(text.replace("[secondary]\n", f'[secondary]\nnetns = "{hosts.lab.hosts[host].netns}"\n', 1))
    image(hosts.dir / "s.img", DISK, b"\x11")           # S equal to P: --assume-clean
    try:
        _run(hosts)
    finally:
        for host in ("p", "s"):
            cli_of(hosts, host, "down", "--force")


def _run(hosts):
    s_proc = _start(hosts, "s")
    _listening(hosts, "s")
    p_proc = _start(hosts, "p", "--assume-clean")
    _replicating(hosts, "p")
    expected = bytearray(b"\x11" * DISK)
    w1 = _pattern(b"a-wrote", MiB)
    blockdev.write_at(TOP, 0, w1)
    expected[:MiB] = w1

    # Refused, nothing changed: the consumer holds the device; the other host's standby consumer
    # holds its view; the command on the secondary.
    fd = os.open(TOP, os.O_RDONLY)
    try:
        r = cli_of(hosts, "p", "switchover")
        assert r.returncode == 1 and "stop the consumer first" in r.stderr, r.stderr
    finally:
        os.close(fd)
    fd = os.open(B_ACTIVE, os.O_RDONLY)
    try:
        r = cli_of(hosts, "p", "switchover")
        assert r.returncode == 1 and "refused by the secondary" in r.stderr and "standby consumer" in r.stderr, \
            r.stderr
    finally:
        os.close(fd)
    r = cli_of(hosts, "s", "switchover")
    assert r.returncode == 1 and "runs on the primary" in r.stderr, r.stderr
    st = status_of(hosts, "p")
    assert st["state"] == "replicating", st
    assert (_state(hosts, "p").role, _state(hosts, "s").role) == ("primary", "secondary")
    blockdev.write_at(TOP, MiB, w1[:4096])          # still the primary: the write replicates
    expected[MiB:MiB + 4096] = w1[:4096]

    # A -> B.  Same processes, roles swapped, B's disk exactly A's, nothing copied.
    report, pause, total = _switchover(hosts, "p", B_TOP)
    n = report["checkpoint"]
    assert report["rolled_back_bytes"] == 0 and report["recheck_bytes"] <= 64 * 1024, report
    assert p_proc.poll() is None and s_proc.poll() is None, (hosts.log("p")[-2000:], hosts.log("s")[-2000:])
    b = _replicating(hosts, "s")
    assert b["pid"] == s_proc.pid and b["checkpoint"] == n + 1, b
    assert b["last_resync"]["differing_bytes"] == 0 and b["last_resync"]["copied_bytes"] == 0, b["last_resync"]
    a = _state(hosts, "p")
    assert (a.role, a.checkpoint, a.diverged) == ("secondary", n + 1, None), a
    assert not os.path.exists(TOP)
    assert blockdev.read_at(B_TOP, 0, DISK) == bytes(expected)
    print(f"\nswitchover A->B at checkpoint {n}: consumer paused {pause:.2f} s (until B's device), "
          f"handover {report['seconds']:.2f} s, replicating again after {total:.2f} s")

    w2 = _pattern(b"b-wrote", MiB)
    blockdev.write_at(B_TOP, 2 * MiB, w2)
    expected[2 * MiB:3 * MiB] = w2
    assert cli_of(hosts, "s", "checkpoint").returncode == 0
    assert blockdev.read_at(A_ACTIVE, 0, DISK) == bytes(expected)      # A's standby view: B's writes

    # B -> A, back.
    report, pause, total = _switchover(hosts, "s", TOP)
    m = report["checkpoint"]
    assert report["rolled_back_bytes"] == 0 and report["recheck_bytes"] <= 64 * 1024, report
    a = _replicating(hosts, "p")
    assert a["pid"] == p_proc.pid and a["checkpoint"] == m + 1, a
    assert a["last_resync"]["differing_bytes"] == 0, a["last_resync"]
    assert blockdev.read_at(TOP, 0, DISK) == bytes(expected)
    with open(hosts.dir / "s.img", "rb") as f:
        assert f.read() == bytes(expected)
    print(f"switchover B->A at checkpoint {m}: consumer paused {pause:.2f} s, handover {report['seconds']:.2f} s, "
          f"replicating again after {total:.2f} s")
    w3 = _pattern(b"a-again", MiB)
    blockdev.write_at(TOP, 3 * MiB, w3)
    expected[3 * MiB:4 * MiB] = w3
    assert cli_of(hosts, "p", "checkpoint").returncode == 0
    assert blockdev.read_at(B_ACTIVE, 0, DISK) == bytes(expected)
