"""One switch, one rollback: faults injected into a checkpoint and a failover (kernel tier).

The kernel is real; one chosen call fails once, either before it reaches the
kernel (the ioctl "returned an error") or after it did its work (the kernel
swapped the table, then the caller saw an error).  Whatever fails, every device
must end up resumed on the table it had, the state file at the previous
checkpoint, the bytes of the consumer's view unchanged, and the stack usable.
"""

import errno

import pytest
from test_secondary import DISK, MiB, assert_bytes, make_cfg

from dmrepl.errors import DmreplError
from dmrepl.kernel import blockdev, dm
from dmrepl.kernel.errors import DMError
from dmrepl.kernel.switch import SwitchError
from dmrepl.roles.secondary import Secondary


class FaultyControl(dm.Control):
    """/dev/mapper/control with one call that fails once."""

    def __init__(self):
        super().__init__()
        self.fault: tuple[str, str, bool] | None = None   # (call, device, after the kernel did it)
        self.fired = False

    def arm(self, call: str, device: str, *, after: bool = False) -> None:
        self.fault, self.fired = (call, device, after), False

    def _maybe_fail(self, call: str, name: str, do):
        if self.fault is None or self.fired or self.fault[:2] != (call, name):
            return do()
        self.fired = True
        if self.fault[2]:
            do()
        raise DMError(errno.EIO, {"load": "DM_TABLE_LOAD", "resume": "DM_DEV_SUSPEND"}[call], name, "injected")

    def load(self, name, targets):
        return self._maybe_fail("load", name, lambda: super(FaultyControl, self).load(name, targets))

    def resume(self, name):
        return self._maybe_fail("resume", name, lambda: super(FaultyControl, self).resume(name))


@pytest.fixture
def faulty():
    c = FaultyControl()
    try:
        yield c
    finally:
        c.close()


def _snapshot(sec: Secondary):
    """What must not change: tables, suspend flags, inactive tables, the state."""
    out = {}
    for part in ("origin", "hidden", "active"):
        name = sec.stack.dm(part)
        info = sec.ctl.info(name)
        out[part] = (info.suspended, info.inactive_table,
                     [(t.target_type, t.text) for t in sec.ctl.table(name)])
    st = sec.state()
    return out, (st.role, st.checkpoint, st.current_store)


VIEW = [(0, 4 * MiB, b"\x33"), (4 * MiB, 4 * MiB, b"\x11"), (8 * MiB, 56 * MiB, b"\x11")]


def _prepare(sec: Secondary):
    sec.up()
    blockdev.write_at(sec.origin_path, 4 * MiB, b"\x22" * (4 * MiB))    # primary, after checkpoint 0
    blockdev.write_at(sec.active_path, 0, b"\x33" * (4 * MiB))          # consumer
    assert_bytes(sec.active_path, VIEW)
    return _snapshot(sec)


def _usable_after(sec: Secondary):
    """The stack still works: a checkpoint now shows S exactly."""
    st, _ = sec.checkpoint()
    assert st.checkpoint == 1
    assert_bytes(sec.active_path, [(0, 4 * MiB, b"\x11"), (4 * MiB, 4 * MiB, b"\x22"), (8 * MiB, 56 * MiB, b"\x11")])


CASES = [
    ("checkpoint", "load", "hidden", False),
    ("checkpoint", "resume", "hidden", False),
    ("checkpoint", "resume", "hidden", True),
    ("checkpoint", "resume", "active", True),
    ("failover", "load", "origin", False),
    ("failover", "load", "active", False),
    ("failover", "resume", "origin", False),
]


@pytest.mark.parametrize("op,call,part,after", CASES, ids=[f"{o}-{c}-{p}{'-after' if a else ''}"
                                                           for o, c, p, a in CASES])
def test_a_failing_call_rolls_the_switch_back(tmp_path, faulty, op, call, part, after):
    sec = Secondary(make_cfg(tmp_path), faulty)
    try:
        before = _prepare(sec)
        faulty.arm(call, sec.stack.dm(part), after=after)
        with pytest.raises(SwitchError) as e:
            getattr(sec, op)()
        assert faulty.fired and e.value.errno == errno.EIO and "injected" in str(e.value)
        assert e.value.rollback_failures == []
        assert _snapshot(sec) == before
        assert_bytes(sec.active_path, VIEW)
        _usable_after(sec)
    finally:
        sec.down(force=True)


@pytest.mark.parametrize("op", ["checkpoint", "failover"])
def test_a_failing_state_write_rolls_the_switch_back(tmp_path, ctl, monkeypatch, op):
    sec = Secondary(make_cfg(tmp_path), ctl)
    try:
        before = _prepare(sec)
        real_save = sec.states.save

        def full_disk(state):
            monkeypatch.setattr(sec.states, "save", real_save)  # once
            raise OSError(errno.ENOSPC, "No space left on device", sec.states.path)

        monkeypatch.setattr(sec.states, "save", full_disk)
        with pytest.raises(SwitchError) as e:
            getattr(sec, op)()
        assert e.value.errno == errno.ENOSPC and e.value.rollback_failures == []
        assert _snapshot(sec) == before
        assert_bytes(sec.active_path, VIEW)
        _usable_after(sec)
    finally:
        sec.down(force=True)


def test_switch_error_reaches_the_user_as_a_sentence(tmp_path, faulty):
    sec = Secondary(make_cfg(tmp_path), faulty)
    try:
        sec.up()
        faulty.arm("load", sec.stack.dm("hidden"))
        with pytest.raises(SwitchError) as e:
            sec.checkpoint()
        assert str(e.value) == (f"DM_TABLE_LOAD {sec.stack.dm('hidden')}: Input/output error (EIO): "
                                "injected; switch rolled back")
        assert not isinstance(e.value, DmreplError) and isinstance(e.value, OSError)
        assert DISK == blockdev.size_bytes(sec.active_path)
    finally:
        sec.down(force=True)
