"""Hello: two configs that disagree are refused with what differs (unit tier)."""

import pytest

from dmrepl.roles.hello import Hello, agree

P = Hello("vm1", "primary", 64 << 20, 8, 2048, [0, 1, 2, 3])
S = Hello("vm1", "secondary", 64 << 20, 8, 2048, [2, 3])


def test_matching_hosts_agree_on_the_newest_common_checkpoint():
    a = agree(P, S)
    assert a.ok and a.reasons == [] and a.common_checkpoint == 3
    assert agree(S, P).common_checkpoint == 3


@pytest.mark.parametrize("change,reason", [
    ({"resource_id": "vm2"}, "resource id: this host has 'vm1', the peer 'vm2'"),
    ({"size_bytes": 128 << 20}, f"disk size: this host's is {64 << 20} bytes, the peer's {128 << 20}"),
    ({"chunk_sectors": 32}, "chunk size: this host expects 4 KiB, the peer 16 KiB"),
    ({"era_block_sectors": 128}, "era block size: this host uses 1024 KiB, the peer 64 KiB"),
    ({"role": "primary", "checkpoints": [2]},
     "SPLIT BRAIN: both hosts are primary (this host at checkpoint 3, the peer at 2): each may hold writes the "
     "other lacks, and neither is overwritten on its own; on the host whose writes are to be given up: "
     "`dmrepl down NAME`, `dmrepl resolve NAME --discard-my-data`, `dmrepl up NAME`"),
])
def test_each_disagreement_is_named(change, reason):
    theirs = Hello(**{**S.to_wire(), **change})
    a = agree(P, theirs)
    assert not a.ok and a.reasons == [reason]


def test_two_secondaries_are_told_one_of_each_is_needed():
    assert agree(S, S).reasons == ["roles: this host is secondary, the peer is secondary: one of each is needed"]


def test_no_common_checkpoint_and_wire_round_trip():
    assert agree(P, Hello(**{**S.to_wire(), "checkpoints": [7]})).common_checkpoint is None
    assert Hello.from_wire(P.to_wire()) == P
    with pytest.raises(ValueError) as e:
        Hello.from_wire({"resource_id": "vm1"})
    assert "hello without a valid" in str(e.value)


def test_the_store_size_travels_and_an_older_peer_without_it_reads_as_zero():
    from dmrepl.roles.hello import Hello

    h = Hello("r", "secondary", 1 << 30, 8, 2048, [3], store_bytes=1 << 28)
    assert Hello.from_wire(h.to_wire()) == h
    old = h.to_wire()
    del old["store_bytes"]
    assert Hello.from_wire(old).store_bytes == 0
