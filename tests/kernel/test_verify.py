"""`dmrepl verify NAME [--repair]`: P and S compared by digests while replication runs (kernel tier, e2e)."""

from __future__ import annotations

import json
import os

from daemons_lab import DISK, TOP, MiB, image

from dmrepl import poll
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
