"""The verify job's phases (daemon/verify.py) on two files: slices, the live recheck, the frozen
confirmation and its batches.  The kernel tier (tests/kernel/test_verify.py) runs it on the real
stack between two hosts; here the peer's digests come from a second file and `frozen` is a call
that says when it ran."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from dmrepl.daemon import verify as verify_mod
from dmrepl.daemon.verify import CONFIRM_PIECES, Verify
from dmrepl.roles import digests

pytestmark = pytest.mark.unit
KiB, MiB = 1 << 10, 1 << 20


@dataclass
class Devs:
    disk: str


class Pri:
    """The primary's side the job uses: its size, and the moment the writes are suspended."""

    def __init__(self, size: int, during_pause=lambda: None):
        self.size, self.during_pause, self.pauses = size, during_pause, 0

    def size_bytes(self) -> int:
        return self.size

    def frozen(self, fn) -> float:
        self.pauses += 1
        self.during_pause()
        fn()
        return 0.002


def _job(tmp_path, monkeypatch, size: int, s_changes: list[int], *, in_flight: list[int] = (),
         rate=None) -> tuple[Verify, Pri]:
    p, s = tmp_path / "p.img", tmp_path / "s.img"
    p.write_bytes(b"\x11" * size)
    data = bytearray(b"\x11" * size)
    for off in s_changes:
        data[off:off + 7] = b"\xee" * 7
    s.write_bytes(bytes(data))
    # A write in flight: S lags at these offsets until the writes are suspended (they land then).
    lagging = bytearray(data)
    for off in in_flight:
        lagging[off:off + 3] = b"\x99" * 3
    view = tmp_path / "s-view.img"          # what S's digests are read from
    view.write_bytes(bytes(lagging))

    def land():
        view.write_bytes(bytes(data))

    pri = Pri(size, land)
    monkeypatch.setattr(Verify, "_remote", lambda self, spans, piece: (
        lambda: digests.of_spans(str(view), spans, piece)))
    return Verify(pri, Devs(str(p)), session=None, silence_s=1.0, rate_bytes_s=rate), pri


def _run(job: Verify) -> int:
    steps = 0
    while not job.step():
        steps += 1
        assert steps < 10_000
    return steps


def test_a_real_difference_is_confirmed_with_the_writes_suspended(tmp_path, monkeypatch):
    job, pri = _job(tmp_path, monkeypatch, 16 * MiB, [4 * KiB, 9 * MiB])
    _run(job)
    r = job.report()
    assert r["differing"] == [[4 * KiB, 4 * KiB], [9 * MiB, 4 * KiB]]
    assert (r["first_pass_differing_pieces"], r["frozen_pieces"], r["frozen_pauses"], pri.pauses) == (2, 2, 1, 1)


def test_a_write_in_flight_is_not_reported(tmp_path, monkeypatch):
    job, pri = _job(tmp_path, monkeypatch, 4 * MiB, [], in_flight=[64 * KiB, 3 * MiB])
    # The recheck (live) still sees them differ: S's copy lands only when the writes are suspended.
    _run(job)
    r = job.report()
    assert r["differing"] == [] and (r["first_pass_differing_pieces"], r["frozen_pieces"]) == (2, 2)


def test_many_differences_take_several_short_pauses(tmp_path, monkeypatch):
    n = CONFIRM_PIECES * 2 + 10
    job, pri = _job(tmp_path, monkeypatch, 8 * MiB, [i * 4 * KiB for i in range(n)])
    _run(job)
    r = job.report()
    assert r["differing"] == [[0, n * 4 * KiB]] and r["frozen_pauses"] == pri.pauses == 3


def test_slices_follow_the_rate(tmp_path, monkeypatch):
    monkeypatch.setattr(verify_mod, "SLICE_BYTES", 1 * MiB)
    job, _ = _job(tmp_path, monkeypatch, 4 * MiB, [])
    assert job.slice_pieces() == 256 and _run(job) == 4      # 4 slices of 1 MiB (the recheck ends it)
    slow, _ = _job(tmp_path, monkeypatch, 4 * MiB, [], rate=1 * MiB)
    assert slow.slice_pieces() == 64                          # 0.25 s at 1 MiB/s: 256 KiB
    t0 = slow.due
    slow.step()
    assert slow.due - t0 == pytest.approx(0.25, abs=0.05)     # the next slice waits for the rate
