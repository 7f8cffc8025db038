"""dm-mirror over two loop devices (kernel tier)."""

from dmrepl import poll
from dmrepl.kernel import blockdev
from dmrepl.kernel.status import MirrorStatus
from dmrepl.kernel.tables import Mirror

MiB = 1 << 20
SECTORS_PER_MiB = MiB // 512


def test_write_lands_on_both_legs(ctl, loops, devices):
    a = loops.make("a", 16 * MiB)
    b = loops.make("b", 16 * MiB)
    name = devices.create("mirror", [Mirror(0, 16 * SECTORS_PER_MiB, "core", ("1024", "nosync"),
                                            ((a, 0), (b, 0)))])
    st = MirrorStatus.parse(ctl.status(name)[0].text)
    assert st.health == "AA" and st.total_regions == 32  # 16 MiB / 512 KiB regions
    pattern = bytes((i * 7) & 0xFF for i in range(4096)) * 256  # 1 MiB
    blockdev.write_at(f"/dev/mapper/{name}", 3 * MiB, pattern)
    assert blockdev.read_at(a, 3 * MiB, MiB) == pattern
    assert blockdev.read_at(b, 3 * MiB, MiB) == pattern
    poll.wait_for(lambda: MirrorStatus.parse(ctl.status(name)[0].text), "the nosync mirror to report in sync",
                  ok=lambda st: st.in_sync)
