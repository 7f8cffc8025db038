"""`dmrepl verify NAME [--repair]` and the scheduled verify: P and S compared by digests while
replication runs, a difference confirmed with the writes suspended (kernel tier, e2e)."""

from __future__ import annotations

import json
import os
import random
import threading
import time

from daemons_lab import DISK, NAME, TOP, MiB, image

from dmrepl import poll
from dmrepl.daemon import control
from dmrepl.kernel import blockdev

KiB = 1024


def _file(path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def test_verify_names_exactly_the_corrupted_pieces_and_repair_copies_only_them(hosts):
    image(hosts.dir / "s.img", DISK, b"\x11")
    hosts.start_secondary()
    hosts.start_primary("--assume-clean")
    blockdev.write_at(TOP, 2 * MiB, os.urandom(MiB))          # replicated: equal on both
    r = hosts.cli("p", "verify", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["differing"] == []

    # S changes behind dmrepl's back: two pieces apart, and two in a row.
    with open(hosts.dir / "s.img", "r+b") as f:
        for off in (5 * MiB + 4 * KiB, 20 * MiB, 20 * MiB + 4 * KiB):
            f.seek(off)
            f.write(b"\xee" * 7)
        f.flush()
        os.fsync(f.fileno())
    r = hosts.cli("p", "verify", "--json")
    assert r.returncode == 1, r.stderr
    out = json.loads(r.stdout)
    assert out["differing"] == [[5 * MiB + 4 * KiB, 4 * KiB], [20 * MiB, 8 * KiB]], out
    # Found on the first pass, then again live, then with the writes suspended (one pause).
    assert (out["first_pass_differing_pieces"], out["frozen_pieces"], out["frozen_pauses"]) == (3, 3, 1), out
    # Two levels: a digest per 32 KiB of the disk, then per 4 KiB inside the two groups that differ;
    # then the 3 differing pieces twice more (a difference must hold on three passes).
    assert out["digest_bytes"] == (DISK // (32 * KiB) + 2 * 8 + 2 * 3) * 16 and out["compared_bytes"] == DISK
    text = hosts.cli("p", "verify")
    assert "2 range(s) differ" in text.stdout and f"differ: bytes [{20 * MiB}, {20 * MiB + 8 * KiB})" in text.stdout

    r = hosts.cli("p", "verify", "--repair", "--json")
    assert r.returncode == 0, r.stderr
    s = poll.wait_for(hosts.status, "the repair", timeout=120,
                      ok=lambda s: s["state"] == "replicating" and s["last_resync"].get("phase") == "copied")
    assert s["last_resync"]["copy_bytes"] == 12 * KiB, s["last_resync"]
    assert _file(hosts.dir / "p.img") == _file(hosts.dir / "s.img")
    assert json.loads(hosts.cli("p", "verify", "--json").stdout)["differing"] == []

    r = hosts.cli("s", "verify")
    assert r.returncode == 1 and "verify runs on the primary" in r.stderr, r.stderr


def _events(hosts, kind: str) -> list[dict]:
    path = hosts.dir / "p-state" / NAME / "events.jsonl"
    with open(path) as f:
        return [e for e in map(json.loads, f) if e["event"] == kind]


def test_a_busy_writer_and_checkpoints_during_verify_give_no_false_report_and_the_schedule_runs(hosts):
    image(hosts.dir / "s.img", DISK, b"\x11")
    hosts.write_configs(primary='verify_interval_s = 15\nverify_rate = "16M"\n')
    hosts.start_secondary()
    hosts.start_primary("--assume-clean")
    sock = hosts.socket()
    stop = threading.Event()
    written: dict[int, bytes] = {}
    checkpoints: list[tuple[float, float, dict]] = []

    def writer(first: int, pieces: int):     # 4 KiB O_DIRECT writes: some race each comparison
        mine = random.Random(first)
        while not stop.is_set():
            off = (first + mine.randrange(pieces)) * 4096
            data = mine.randbytes(4096)
            blockdev.write_at(TOP, off, data)
            written[off] = data

    def checkpointer():           # the loop takes checkpoints between a verify's slices
        while not stop.wait(0.7):
            t0 = time.monotonic()
            r = control.request(sock, "checkpoint", timeout=60)
            checkpoints.append((t0, time.monotonic(), r))

    # One writer all over the disk, one on 16 pieces (64 KiB) again and again: the hot pieces are
    # often mid-write when a comparison reads them.
    threads = [threading.Thread(target=writer, args=(0, DISK // 4096 - 16)),
               threading.Thread(target=writer, args=(DISK // 4096 - 16, 16)), threading.Thread(target=checkpointer)]
    for t in threads:
        t.start()
    runs = []
    try:
        for i in range(20):
            t0 = time.monotonic()
            r = control.request(sock, "verify", timeout=None)
            runs.append((t0, time.monotonic(), r))
            assert r["differing"] == [], (i, r)          # no write in flight is ever a difference
        # A rate limit: 32 MiB at 4 MiB/s cannot take less than 8 s (a slice's time is planned
        # from its start: at most one slice early).
        for _ in range(3):      # a scheduled verify may have begun first: this request then waits for it
            r = hosts.cli("p", "verify", "--rate", "4M", "--json")
            assert r.returncode == 0, r.stderr
            limited = json.loads(r.stdout)
            if limited["why"] == "on demand":
                break
        assert limited["differing"] == [] and limited["rate_limit_bytes_s"] == 4 * MiB, limited
        assert limited["seconds"] >= 7.5, limited
    finally:
        stop.set()
        for t in threads:
            t.join()
    # Checkpoints went on while verifies ran (not after them), none failed.
    during = [c for c in checkpoints if any(a < c[0] and c[1] < b for a, b, _ in runs)]
    assert len(during) >= 5, (len(checkpoints), len(during))
    raced = sum(r["first_pass_differing_pieces"] for _a, _b, r in runs)
    frozen = sum(r["frozen_pieces"] for _a, _b, r in runs)
    print(f"20 verifies under a writer ({len(written)} blocks written): {raced} piece(s) differed on a first "
          f"pass, {frozen} compared with the writes suspended, 0 reported; {len(during)} checkpoints during them, "
          f"the longest request {max(b - a for a, b, _ in checkpoints):.2f} s")

    # The schedule: 15 s after the last verify ended (a run on demand counts), one runs on its own.
    s = poll.wait_for(hosts.status, "the scheduled verify", timeout=120,
                      ok=lambda s: s["last_verify"].get("why") == "schedule")
    assert s["last_verify"]["differing"] == [] and s["last_verify"]["rate_limit_bytes_s"] == 16 * MiB, s
    assert s["verify_interval_s"] == 15
    assert [e["why"] for e in _events(hosts, "verify")][-1] == "schedule"
    text = hosts.cli("p", "status").stdout
    assert "last verify (schedule): P and S equal" in text and "verify every 15 s" in text, text

    # Every block the writer wrote is on P and, after a checkpoint, in S's standby view; the disks are equal.
    control.request(sock, "checkpoint", timeout=60)
    for off, data in written.items():
        assert blockdev.read_at(TOP, off, 4096) == data
    assert _file(hosts.dir / "p.img") == _file(hosts.dir / "s.img")
