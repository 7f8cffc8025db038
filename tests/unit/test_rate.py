"""A copy's rate limits (roles/primary/rate.py): floor, ceiling, share, the consumer's measured rate."""

from __future__ import annotations

import pytest

from dmrepl.roles.primary.rate import PLAN_S, Controller, Limits, Pacer

pytestmark = pytest.mark.unit
MiB = 1 << 20


@pytest.mark.parametrize("consumer,want", [
    (0, 100 * MiB),                 # idle consumer: the ceiling
    (10 * MiB, 50 * MiB),           # writing: at most the share (half) of the ceiling
    (70 * MiB, 30 * MiB),           # what the consumer leaves of the ceiling
    (95 * MiB, 10 * MiB),           # never below the floor
    (500 * MiB, 10 * MiB),
])
def test_the_rate_is_what_the_consumer_leaves_between_floor_and_share(consumer, want):
    assert Limits(floor_bytes_s=10 * MiB, ceiling_bytes_s=100 * MiB, share=0.5).rate(consumer) == want


def test_no_ceiling_no_limit_and_bad_limits_are_refused():
    assert Limits(floor_bytes_s=10 * MiB).rate(0) is None and Limits(floor_bytes_s=10 * MiB).rate(50 * MiB) is None
    lim = Limits(floor_bytes_s=1 * MiB, ceiling_bytes_s=8 * MiB)
    assert lim.changed(ceiling_bytes_s=0) == Limits(floor_bytes_s=1 * MiB, ceiling_bytes_s=None)          # 0: no limit
    assert lim.changed(share=0.25, floor_bytes_s=None) == Limits(1 * MiB, 8 * MiB, 0.25)  # None: unchanged
    with pytest.raises(ValueError, match="the floor .* is above the ceiling"):
        lim.changed(floor_bytes_s=16 * MiB)
    with pytest.raises(ValueError, match="share of the link must be more than 0 and at most 1"):
        lim.changed(share=1.5)


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, s: float) -> None:
        self.now += s


def test_the_consumer_rate_is_measured_over_the_plan_time():
    clock, written = Clock(), [0]
    c = Controller(Limits(floor_bytes_s=0, ceiling_bytes_s=100 * MiB, share=1.0), lambda: written[0], clock)
    assert c.rate() == 100 * MiB                  # first sample: nothing measured yet
    written[0] += 30 * MiB
    clock.now += PLAN_S / 2
    assert c.rate() == 100 * MiB                  # not a whole plan time yet: the old figure
    clock.now += PLAN_S / 2
    assert c.rate() == 70 * MiB and c.status()["consumer_write_bytes_s"] == 30 * MiB
    clock.now += PLAN_S
    assert c.rate() == 100 * MiB                  # it stopped writing
    written[0] += 50 * MiB
    clock.now += 10 * PLAN_S                      # not sampled for long: a new window, the old figure
    assert c.rate() == 100 * MiB
    written[0] += 10 * MiB
    clock.now += PLAN_S
    assert c.rate() == 90 * MiB
    c.limits = c.limits.changed(ceiling_bytes_s=0)        # `dmrepl tune --resync-max 0`
    assert c.rate() is None and c.status()["rate_limit_bytes_s"] is None


def test_the_pacer_holds_a_copy_to_its_rate_and_follows_a_new_one():
    clock = Clock()
    c = Controller(Limits(ceiling_bytes_s=4 * MiB), lambda: 0, clock)
    pace = Pacer(c, sleep=clock.sleep, clock=clock)
    t0 = clock.now
    for done in range(0, 8 * MiB + 1, MiB):      # the copy reports each MiB at once: it must wait
        pace(done)
    assert clock.now - t0 == pytest.approx(2.0)   # 8 MiB at 4 MiB/s
    c.limits = c.limits.changed(ceiling_bytes_s=8 * MiB)  # faster from here
    t1 = clock.now
    for done in range(8 * MiB, 16 * MiB + 1, MiB):
        pace(done)
    assert clock.now - t1 == pytest.approx(1.0)    # re-anchored at 8 MiB by the change: 8 MiB more at 8 MiB/s
    t2 = clock.now
    for done in range(0, 4 * MiB + 1, MiB):       # the next phase starts from naught: paced afresh
        pace(done)
    assert clock.now - t2 == pytest.approx(0.5)
    c.limits = c.limits.changed(ceiling_bytes_s=0)
    t3 = clock.now
    for done in range(4 * MiB, 64 * MiB, MiB):
        pace(done)
    assert clock.now == t3                        # no limit: no wait


def test_a_stopping_daemon_is_not_held():
    clock = Clock()
    pace = Pacer(Controller(Limits(ceiling_bytes_s=1 * MiB), lambda: 0, clock), stopping=lambda: True,
                 sleep=clock.sleep, clock=clock)
    pace(0)
    pace(64 * MiB)
    assert clock.now == 100.0
