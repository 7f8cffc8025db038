"""A resync's rate limits (resync_max, resync_min, resync_share; `dmrepl tune`): kept while the
consumer writes, changed while the resync runs, the consumer's latency within its bound (kernel tier)."""

from __future__ import annotations

import json
import statistics
import time

from daemons_lab import DISK, NAME, TOP, MiB, Writer, image

from dmrepl import poll
from dmrepl.kernel import blockdev

KiB = 1024
BULK = 2 * MiB                   # written while the link is down: what the resync copies
# Under TCG the kernel copies a resync's small regions at about 0.5 MiB/s (one region at a time,
# each a round trip over NBD): the limits sit well below that, so that they are what holds it.
CEILING, FLOOR, SHARE = 256 * KiB, 64 * KiB, 0.5
# The consumer's write latency during a limited resync, against its latency while replicating
# without one: the median at most this many times (the bound the README states).
LATENCY_BOUND = 2.0
SAMPLES = 20                     # writes timed in each window at least


def _file(path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _latencies(w: Writer, t0: float, t1: float) -> list[float]:
    return [s for t, s in w.latencies if t0 <= t < t1]


def test_a_resync_keeps_to_its_limits_beside_the_consumer_and_tune_lifts_them_while_it_runs(hosts):
    hosts.nbd_timeout_s = 5          # the writer's longest wait when the link goes down
    hosts.write_configs(primary=f'reconnect_interval_s = 1\nresync_max = "{CEILING >> 10}K"\n'
                                f'resync_min = "{FLOOR >> 10}K"\nresync_share = {SHARE}\n')
    image(hosts.dir / "s.img", DISK, b"\x11")
    hosts.start_secondary()
    hosts.start_primary("--assume-clean")
    blocks = list(range((DISK - 4 * MiB) // (4 * KiB), DISK // (4 * KiB)))     # the last 4 MiB
    with Writer(blocks, pause_s=0.02) as w:
        t0 = time.monotonic()
        time.sleep(4)
        poll.wait_for(lambda: len(_latencies(w, t0, time.monotonic())) >= SAMPLES, "the writer's baseline", timeout=60)
        baseline = _latencies(w, t0, time.monotonic())
        hosts.lab.link_down("s")
        poll.wait_for(hosts.status, "the primary to degrade", ok=lambda s: s["state"] == "degraded", timeout=30)
        blockdev.write_at(TOP, 4 * MiB, bytes(range(256)) * (BULK // 256))
        hosts.lab.link_up("s")
        s = poll.wait_for(hosts.status, "the resync's copy", timeout=60,
                          ok=lambda s: s["state"] == "resyncing" and (s["resync"] or {}).get("phase") == "copying")
        t_copy = time.monotonic()
        time.sleep(3)
        # Under load a write may wait out the window (a region being copied): at least SAMPLES.
        poll.wait_for(lambda: len(_latencies(w, t_copy, time.monotonic())) >= SAMPLES, "the writer during the copy",
                      timeout=60)
        during = _latencies(w, t_copy, time.monotonic())
        r = hosts.status()["resync"]
        assert r["phase"] == "copying" and r["copy_bytes"] >= BULK, r
        # The consumer writes: the resync takes at most the share of the ceiling, and what the
        # consumer leaves of it, never less than the floor; status shows the figures it used.
        c = r["consumer_write_bytes_s"]
        assert c > 0 and (r["ceiling_bytes_s"], r["floor_bytes_s"], r["share"]) == (CEILING, FLOOR, SHARE), r
        assert r["rate_limit_bytes_s"] == int(min(max(min(CEILING - c, SHARE * CEILING), FLOOR), CEILING)), r
        # Copied so far: no more than the limit allowed, give or take the batch in flight.
        batch = max(r["copy_region_bytes"], int(SHARE * CEILING) // r["copy_region_bytes"] * r["copy_region_bytes"])
        assert r["copied_bytes"] <= SHARE * CEILING * r["copy_seconds"] + batch, r
        assert r["copied_bytes"] < r["copy_bytes"] and r["eta_s"] is not None and r["batches"] >= 2, r

        limited = r["rate_limit_bytes_s"]
        # Tune: no limit from now on, for this resync too.
        out = hosts.cli("p", "tune", "--resync-max", "0", "--json")
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout)["now"]["ceiling_bytes_s"] is None
        t_tune = time.monotonic()
        r = hosts.status()["resync"]
        left = r["copy_bytes"] - r["copied_bytes"]
        s = poll.wait_for(hosts.status, "the resync to end", timeout=120, ok=lambda s: s["state"] == "replicating")
        took = time.monotonic() - t_tune
    # No limit from the tune on: the batch in flight then, and one more with all that was left
    # (the kernel's speed, not a timing, is what this cannot assert: under TCG it is slow).
    done = s["last_resync"]
    assert r["batches"] <= done["batches"] <= r["batches"] + 1 and left > done["copy_region_bytes"], (r, done)
    assert s["copy_rate"]["ceiling_bytes_s"] is None and done["rate_limit_bytes_s"] is None
    tune = [json.loads(line) for line in open(hosts.dir / "p-state" / NAME / "events.jsonl")
            if '"event": "tune"' in line]
    assert [e["ceiling_bytes_s"] for e in tune] == [None]
    assert hosts.cli("p", "checkpoint").returncode == 0
    assert _file(hosts.dir / "p.img") == _file(hosts.dir / "s.img")
    for blk, data in w.last.items():
        assert blockdev.read_at(TOP, blk * 4 * KiB, 4 * KiB) == data

    base, dur = statistics.median(baseline), statistics.median(during)
    print(f"\nconsumer 4 KiB writes: median {base * 1000:.1f} ms replicating, {dur * 1000:.1f} ms during the "
          f"resync limited to {limited / MiB:.2f} MiB/s ({dur / base:.2f}x; p90 "
          f"{statistics.quantiles(baseline, n=10)[-1] * 1000:.1f} -> {statistics.quantiles(during, n=10)[-1] * 1000:.1f}"
          f" ms); after tune the last {left >> 10} KiB in {took:.1f} s")
    assert dur <= LATENCY_BOUND * base, (base, dur)
