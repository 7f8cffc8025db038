"""The role table: every operation allowed where it should be and refused elsewhere (unit tier)."""

import pytest

from dmrepl.errors import DmreplError
from dmrepl.roles.transitions import (
    REFUSALS,
    TRANSITIONS,
    InvalidTransition,
    Op,
    Role,
    allowed_in,
    check,
    is_noop,
)


def test_every_pair_has_its_outcome():
    table = {(role, op): check("r", role, op) for role in Role for op in Op if (role, op) in TRANSITIONS}
    assert table == {
        (Role.SECONDARY, Op.CHECKPOINT): Role.SECONDARY,
        (Role.SECONDARY, Op.FAILOVER): Role.MERGING,
        (Role.SECONDARY, Op.WATCH_STORE): Role.SECONDARY,
        (Role.MERGING, Op.FAILOVER): Role.MERGING,
        (Role.MERGING, Op.FINISH_MERGE): Role.PRIMARY,
        (Role.PRIMARY, Op.FINISH_MERGE): Role.PRIMARY,
    }


@pytest.mark.parametrize("role,op", [(r, o) for r in Role for o in Op if (r, o) not in TRANSITIONS])
def test_every_other_pair_is_refused_with_a_hint(role, op):
    with pytest.raises(InvalidTransition) as e:
        check("vm1", role, op)
    assert isinstance(e.value, DmreplError)
    assert str(e.value).startswith(f"resource vm1 is {role}: {REFUSALS[op][0]}")
    assert f"invalid state for {op}: must be " in str(e.value)
    assert e.value.hint == REFUSALS[op][1]


def test_checkpoint_refused_while_merging_names_the_rule():
    with pytest.raises(InvalidTransition) as e:
        check("vm1", "merging", Op.CHECKPOINT)
    assert str(e.value) == ("resource vm1 is merging: checkpoints are taken only on a secondary "
                            "(invalid state for checkpoint: must be secondary)")


def test_every_operation_is_allowed_somewhere_and_has_a_refusal_text():
    for op in Op:
        assert allowed_in(op), op
        assert op in REFUSALS


def test_roles_read_from_the_state_file_as_strings():
    assert check("r", "secondary", Op.FAILOVER) is Role.MERGING
    assert is_noop("merging", Op.FAILOVER) and not is_noop("secondary", Op.FAILOVER)
    with pytest.raises(ValueError):
        check("r", "primary-ish", Op.FAILOVER)


def test_a_secondary_that_gave_its_writes_up_cannot_fail_over_before_its_resync_joined():
    from types import SimpleNamespace

    from dmrepl.roles.secondary.failover import failover
    from dmrepl.state import ResourceState

    st = ResourceState(name="vm1", resource_id="vm1", checkpoint=2, diverged={"checkpoint": 2, "ranges": [[0, 4096]]})
    fenced = []
    with pytest.raises(DmreplError) as e:
        failover(SimpleNamespace(cfg=SimpleNamespace(name="vm1")), None, st, fence=lambda: fenced.append(1))
    assert "its view is not a checkpoint" in str(e.value) and not fenced   # refused before the fence
