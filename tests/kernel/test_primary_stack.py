"""The primary's stack over a real NBD leg (kernel tier): mirror of P and /dev/nbdN, era on top,
and a checkpoint taken on both halves with the secondary's stack in the same kernel."""

import errno

import pytest

from dmrepl.daemon import service
from dmrepl.daemon.export import Export
from dmrepl.kernel import blockdev, loop
from dmrepl.kernel.errors import DMError
from dmrepl.kernel.switch import SwitchError
from dmrepl.nbd.attach import attach
from dmrepl.roles.primary.stack import PrimaryLayout, PrimaryStack
from dmrepl.roles.secondary import Secondary

MiB = 1 << 20
SIZE = 16 * MiB





def _file(path, off, n):
    with open(path, "rb") as f:
        f.seek(off)
        return f.read(n)


def test_a_write_to_the_top_device_is_on_p_and_s_and_era_counts_checkpoints(tmp_path, ctl, loops, nl, free_port):
    n, attached = nl
    p = loops.make("p", SIZE, fill=b"\x11")
    m = loops.make("m", 4 * MiB)
    s_path = tmp_path / "s.img"
    s_path.write_bytes(b"\x11" * SIZE)
    export = Export(str(s_path), "127.0.0.1", free_port(), "r1")
    export.start()
    stack = PrimaryStack("t1", ctl)
    try:
        dev = attach(n, export.host, export.port, "r1", expected_size_bytes=SIZE, connections=2, timeout_s=2)
        attached.append(dev.index)
        stack.build(PrimaryLayout(disk=p, nbd=dev.path, era_metadata=m, era_block_sectors=2048), [])
        assert stack.mirror().health == "AA"
        blockdev.write_at(stack.top_path, MiB, b"\x22" * MiB)
        assert blockdev.read_at(p, MiB, MiB) == b"\x22" * MiB
        assert _file(s_path, MiB, MiB) == b"\x22" * MiB
        assert blockdev.read_at(stack.top_path, 0, 2 * MiB) == b"\x11" * MiB + b"\x22" * MiB
        era0 = stack.era().current_era
        calls = []
        pause = stack.checkpoint(lambda: calls.append("peer"), lambda: calls.append("commit"))
        assert calls == ["peer", "commit"] and 0 < pause < 5
        assert stack.era().current_era > era0
        # A peer that fails: the top device is resumed, writes go on.
        def refuse():
            raise DMError(errno.EIO, "checkpoint", "peer", "refused")
        with pytest.raises(SwitchError):
            stack.checkpoint(refuse, lambda: calls.append("never"))
        assert "never" not in calls and not ctl.info(stack.dm("top")).suspended
        blockdev.write_at(stack.top_path, 3 * MiB, b"\x33" * 4096)
        assert _file(s_path, 3 * MiB, 4096) == b"\x33" * 4096
    finally:
        stack.teardown()
        export.stop()


def test_checkpoint_on_both_halves_gives_the_secondary_the_primarys_view(tmp_path, ctl, loops, nl, capsys, free_port):
    """The secondary's stack and export, the primary's stack on its NBD export, one kernel:
    after a checkpoint the secondary's active view is the primary's device at that instant,
    while the primary keeps writing."""
    from test_secondary import _config_file, make_cfg

    n, attached = nl
    cfg = make_cfg(tmp_path, name="r2", listen_port=free_port())
    config = _config_file(cfg, tmp_path)
    disk = 64 * MiB
    p = loops.make("p", disk, fill=b"\x11")
    m = loops.make("m", 4 * MiB)
    sec = Secondary(cfg, ctl)
    stack = PrimaryStack("r2", ctl)
    try:
        service.up(sec, str(config))
        dev = attach(n, "127.0.0.1", cfg.listen_port, "r2", expected_size_bytes=disk, timeout_s=2)
        attached.append(dev.index)
        stack.build(PrimaryLayout(disk=p, nbd=dev.path, era_metadata=m, era_block_sectors=2048), [])
        blockdev.write_at(stack.top_path, 0, b"\x22" * (4 * MiB))
        # Before any checkpoint the secondary's consumer sees checkpoint 0 (all 0x11).
        assert blockdev.read_at(sec.active_path, 0, 4 * MiB) == b"\x11" * (4 * MiB)
        stack.checkpoint(lambda: sec.checkpoint(), lambda: None)
        at_checkpoint = blockdev.read_at(stack.top_path, 0, 8 * MiB)
        blockdev.write_at(stack.top_path, 2 * MiB, b"\x44" * (4 * MiB))   # the primary goes on
        assert blockdev.read_at(sec.active_path, 0, 8 * MiB) == at_checkpoint
        assert blockdev.read_at(loop.find(cfg.disk)[0], 2 * MiB, 4 * MiB) == b"\x44" * (4 * MiB)
    finally:
        stack.teardown()
        for index in attached:
            n.disconnect(index)
        attached.clear()
        service.down(sec, force=True)


def test_initial_sync_copies_and_verifies_and_refuses_other_sizes(tmp_path, loops, nl, free_port):
    from dmrepl.errors import DmreplError
    from dmrepl.roles.primary import sync

    n, attached = nl
    p = loops.make("p", SIZE, fill=b"\x5a")
    blockdev.write_at(p, 5 * MiB, bytes(range(256)) * 4096)
    s_path = tmp_path / "s.img"
    s_path.write_bytes(b"\x11" * SIZE)
    export = Export(str(s_path), "127.0.0.1", free_port(), "r1")
    export.start()
    try:
        dev = attach(n, export.host, export.port, "r1", expected_size_bytes=SIZE, connections=4)
        attached.append(dev.index)
        seen = []
        result = sync.initial_sync(p, dev.path, progress=lambda phase, d, t: seen.append((phase, d, t)))
        assert result.copied_bytes == SIZE and result.verified_bytes == SIZE and result.copy_mb_s > 0
        assert seen[-1] == ("verify", SIZE, SIZE) and ("copy", SIZE, SIZE) in seen
        assert s_path.read_bytes() == blockdev.read_at(p, 0, SIZE)
        assert sync.differing(p, dev.path) == []
        blockdev.write_at(dev.path, 7 * MiB, b"\x00" * 4096)        # S drifts: the verify pass sees it
        assert sync.differing(p, dev.path) == [(7 * MiB, MiB)]
        small = loops.make("small", SIZE // 2)
        with pytest.raises(DmreplError) as e:
            sync.initial_sync(small, dev.path)
        assert "the two disks must be of one size" in str(e.value)
    finally:
        export.stop()
