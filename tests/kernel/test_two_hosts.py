"""Two hosts in two network namespaces joined by veth, inside the VM (kernel tier, e2e).

The secondary's stack and its nbdkit export live in namespace s; the primary's
NBD sockets are made in namespace p and handed to the kernel; the link between
them is the veth pair, where faults are injected.
"""

import contextlib
import errno
import threading
import time

import pytest
import sweep

from dmrepl import poll
from dmrepl.daemon.export import nbdkit_argv, port_accepts
from dmrepl.kernel import blockdev, loop, modules
from dmrepl.lab import Lab
from dmrepl.nbd import netlink
from dmrepl.nbd.attach import attach
from dmrepl.roles.primary.stack import PrimaryLayout, PrimaryStack
from dmrepl.roles.secondary import Secondary

MiB = 1 << 20
DISK = 64 * MiB
PORT = 10809


@pytest.fixture
def lab():
    with Lab(sweep.lab_tag()) as lab_:
        yield lab_


@pytest.fixture
def two_hosts(tmp_path, ctl, loops, lab):
    """Secondary r3 up in namespace s with its export on the veth address; primary's stack in p."""
    from test_secondary import make_cfg

    cfg = make_cfg(tmp_path, name="r3")
    sec = Secondary(cfg, ctl)
    sec.up()
    s_addr = lab.hosts["s"].address
    export = lab.popen("s", nbdkit_argv(sec.origin_device(), s_addr, PORT, "r3"))
    nl = netlink.NBDNetlink()
    stack = PrimaryStack("r3", ctl)
    dev = None
    try:
        poll.wait_for(lambda: _accepts(lab, s_addr), "nbdkit in s")
        p = loops.make("p", DISK, fill=b"\x11")
        m = loops.make("m", 4 * MiB)
        with lab.inside("p"):
            dev = attach(nl, s_addr, PORT, "r3", expected_size_bytes=DISK, connections=2, timeout_s=2)
        stack.build(PrimaryLayout(disk=p, nbd=dev.path, era_metadata=m, era_block_sectors=2048), [])
        yield sec, stack, dev, nl, export, p
    finally:
        stack.teardown()
        if dev is not None:
            with contextlib.suppress(netlink.NBDNetlinkError):
                nl.disconnect(dev.index)
            poll.wait_for(lambda: nl.is_connected(dev.index), "nbd disconnect", ok=lambda v: not v)
        nl.close()
        export.kill()
        export.wait()
        sec.down(force=True)


def _accepts(lab, addr):
    with lab.inside("s"):
        return port_accepts(addr, PORT)


def test_checkpoints_across_the_link_give_the_secondary_the_primarys_view(two_hosts):
    sec, stack, dev, nl, export, p = two_hosts
    blockdev.write_at(stack.top_path, 0, b"\x22" * (8 * MiB))
    assert blockdev.read_at(loop.find(sec.cfg.disk)[0], 0, 8 * MiB) == b"\x22" * (8 * MiB)   # S, synchronously
    assert blockdev.read_at(sec.active_path, 0, MiB) == b"\x11" * MiB                        # checkpoint 0
    for n in range(1, 4):
        stack.checkpoint(lambda: sec.checkpoint(), lambda: None)
        at_checkpoint = blockdev.read_at(stack.top_path, 0, 16 * MiB)
        blockdev.write_at(stack.top_path, n * MiB, bytes([0x30 + n]) * (4 * MiB))   # the primary goes on
        assert blockdev.read_at(sec.active_path, 0, 16 * MiB) == at_checkpoint
        assert sec.state().checkpoint == n


def test_a_cut_link_is_noticed_and_no_write_hangs(two_hosts, lab):
    """veth down: the next primary write completes within the NBD timeout (the mirror marks the NBD
    leg failed instead of holding the write), LINK_DEAD is announced, the data is on P."""
    sec, stack, dev, nl, export, p = two_hosts
    with netlink.LinkEvents() as events:
        lab.link_down("s")
        done = {}

        def write():
            t0 = time.monotonic()
            try:
                blockdev.write_at(stack.top_path, 20 * MiB, b"\x55" * MiB)
                done["ok"] = time.monotonic() - t0
            except OSError as e:
                done["error"] = e

        t = threading.Thread(target=write, daemon=True)
        t.start()
        t.join(timeout=30)
        assert not t.is_alive(), "a primary write hung with the link cut"
        assert "ok" in done, done
        assert blockdev.read_at(p, 20 * MiB, MiB) == b"\x55" * MiB
        poll.wait_for(lambda: stack.mirror().health, "the mirror to mark the NBD leg failed",
                      ok=lambda h: h == "AD")
        seen = poll.wait_for(lambda: events.wait(1.0), "LINK_DEAD for the cut link",
                             ok=lambda evs: any(e.cmd == netlink.Cmd.LINK_DEAD for e in evs))
        assert netlink.LinkEvent(netlink.Cmd.LINK_DEAD, dev.index) in seen
    lab.link_up("s")


LINK_PORT = 10810
KEY = bytes(range(32))


@contextlib.contextmanager
def secondary_link(lab, sec, hello):
    """The secondary's control link in namespace s: one session served in a thread."""
    import threading

    from dmrepl.daemon import peer
    from dmrepl.link.session import Listener

    with lab.inside("s"):
        listener = Listener(lab.hosts["s"].address, LINK_PORT, KEY)
    refused = []

    def run():
        try:
            session = listener.accept(timeout=30)
        except Exception as e:  # noqa: BLE001
            refused.append(e)
            return
        peer.serve(session, hello, lambda n: sec.checkpoint(number=n)[1])

    t = threading.Thread(target=run, daemon=True)
    t.start()
    try:
        yield refused
    finally:
        listener.close()
        t.join(timeout=30)


def _session(lab):
    from dmrepl.link.session import Session

    with lab.inside("p"):
        return Session.connect(lab.hosts["s"].address, LINK_PORT, KEY)


def _hello(sec, role, **over):
    from dmrepl.roles.hello import Hello

    st = sec.state()
    base = dict(resource_id="r3", role=role, size_bytes=DISK, chunk_sectors=sec.cfg.chunk_sectors,
                era_block_sectors=2048, checkpoints=[st.checkpoint])
    base.update(over)
    return Hello(**base)


def test_checkpoints_over_the_control_link(two_hosts, lab):
    from dmrepl.daemon import peer

    sec, stack, dev, nl, export, p = two_hosts
    with secondary_link(lab, sec, _hello(sec, "secondary")):
        with _session(lab) as session:
            theirs = peer.exchange_hello(session, _hello(sec, "primary"))
            assert theirs.role == "secondary" and theirs.checkpoints == [0]
            recorded = 0
            for n in (1, 2, 3):
                blockdev.write_at(stack.top_path, n * MiB, bytes([0x60 + n]) * MiB)

                def commit():
                    nonlocal recorded
                    recorded = n

                stack.checkpoint(lambda: peer.remote_checkpoint(session, n), commit)
                at_checkpoint = blockdev.read_at(stack.top_path, 0, 8 * MiB)
                blockdev.write_at(stack.top_path, 0, b"\x77" * MiB)          # the primary goes on
                assert blockdev.read_at(sec.active_path, 0, 8 * MiB) == at_checkpoint
                assert recorded == n and sec.state().checkpoint == n


def test_hello_refuses_another_resource_and_changes_nothing(two_hosts, lab):
    from dmrepl.daemon import peer

    sec, stack, dev, nl, export, p = two_hosts
    before = sec.state()
    with secondary_link(lab, sec, _hello(sec, "secondary")):
        with _session(lab) as session:
            with pytest.raises(peer.PeerRefused) as e:
                peer.exchange_hello(session, _hello(sec, "primary", resource_id="other", size_bytes=2 * DISK))
    # Phrased from the primary's side, where the message is read.
    assert "refused this host: resource id: this host has 'other', the peer 'r3'" in str(e.value)
    assert f"disk size: this host's is {2 * DISK} bytes, the peer's {DISK}" in str(e.value)
    assert sec.state() == before


def test_a_checkpoint_that_fails_on_the_secondary_leaves_both_at_the_previous_one(two_hosts, lab, monkeypatch):
    from dmrepl.daemon import peer
    from dmrepl.kernel.switch import SwitchError

    sec, stack, dev, nl, export, p = two_hosts
    real_save = sec.states.save

    def full_disk(state):
        raise OSError(28, "No space left on device", sec.states.path)

    with secondary_link(lab, sec, _hello(sec, "secondary")):
        with _session(lab) as session:
            peer.exchange_hello(session, _hello(sec, "primary"))
            stack.checkpoint(lambda: peer.remote_checkpoint(session, 1), lambda: None)
            blockdev.write_at(stack.top_path, 0, b"\x88" * MiB)
            view = blockdev.read_at(sec.active_path, 0, 2 * MiB)
            monkeypatch.setattr(sec.states, "save", full_disk)
            recorded = []
            with pytest.raises(SwitchError) as e:
                stack.checkpoint(lambda: peer.remote_checkpoint(session, 2), lambda: recorded.append(2))
            assert isinstance(e.value.cause, peer.PeerCheckpointFailed)
            assert "could not take checkpoint 2" in str(e.value) and "No space left" in str(e.value)
            monkeypatch.setattr(sec.states, "save", real_save)
            assert recorded == [] and sec.state().checkpoint == 1
            assert not ctl_suspended(stack)
            assert blockdev.read_at(sec.active_path, 0, 2 * MiB) == view        # still checkpoint 1
            # and the next checkpoint works
            stack.checkpoint(lambda: peer.remote_checkpoint(session, 2), lambda: recorded.append(2))
            assert recorded == [2] and sec.state().checkpoint == 2
            assert blockdev.read_at(sec.active_path, 0, MiB) == b"\x88" * MiB


def ctl_suspended(stack):
    return stack.ctl.info(stack.dm("top")).suspended


def test_a_hundred_checkpoints_under_a_random_writer(two_hosts, lab):
    """A writer thread keeps writing random 4-64 KiB pieces to the primary's device while 100
    checkpoints run over the control link; at each checkpoint (the primary's device frozen) the
    test notes what it holds, and the secondary's active view must equal that afterwards, while
    the writer goes on.  The whole disk is compared every 20 checkpoints, the pieces written
    since the last comparison at every one."""
    import hashlib
    import random

    from dmrepl.daemon import peer

    sec, stack, dev, nl, export, p = two_hosts
    rng = random.Random(2026)
    stop = threading.Event()
    written: list[tuple[int, int]] = []
    lock = threading.Lock()

    def writer():
        i = 0
        while not stop.is_set():
            n = rng.choice((4096, 16384, 65536))
            off = rng.randrange(0, DISK - n, 4096)
            blockdev.write_at(stack.top_path, off, hashlib.sha256(b"%d" % i).digest()[:16] * (n // 16))
            with lock:
                written.append((off, n))
            i += 1

    t = threading.Thread(target=writer, daemon=True)
    with secondary_link(lab, sec, _hello(sec, "secondary")):
        with _session(lab) as session:
            peer.exchange_hello(session, _hello(sec, "primary"))
            t.start()
            try:
                for n in range(1, 101):
                    seen = {}

                    def commit():
                        # The top device is suspended here: nothing moves on P; note what it holds.
                        with lock:
                            ranges = list(written) if n % 20 else [(0, DISK)]
                            written.clear()
                        seen["pieces"] = [(off, ln, blockdev.read_at(p, off, ln)) for off, ln in ranges]

                    stack.checkpoint(lambda: peer.remote_checkpoint(session, n), commit)
                    for off, ln, data in seen["pieces"]:
                        assert blockdev.read_at(sec.active_path, off, ln) == data, (n, off, ln)
                    assert sec.state().checkpoint == n
            finally:
                stop.set()
                t.join(timeout=30)
    assert not t.is_alive()


@pytest.mark.parametrize("first", [None, "cut", "abort"],
                         ids=["disconnect-alone", "cut-then-disconnect", "abort-then-disconnect"])
def test_a_peer_that_acknowledges_nothing_is_cut_off_at_once(lab, loops, first):
    """100% loss on the secondary's side: the primary's 4 MiB writes fill both sockets' send
    buffers and their senders block (nothing is acknowledged).  NBD_CMD_DISCONNECT alone waits
    behind them until the NBD timeout gives their requests up; a shutdown of the sockets first
    (attach.cut, the daemon's own references) or an abort by their addresses (attach.abort over
    sock_diag, for a daemon that took the device over) lets the disconnect fail every request at
    once."""
    from dmrepl.nbd.attach import abort, cut

    timeout_s = 4
    s_disk = loops.make("s", DISK)
    s_addr = lab.hosts["s"].address
    export = lab.popen("s", nbdkit_argv(s_disk, s_addr, PORT, "r3"))
    nl = netlink.NBDNetlink()
    dev = None
    try:
        poll.wait_for(lambda: _accepts(lab, s_addr), "nbdkit in s")
        with lab.inside("p"):
            dev = attach(nl, s_addr, PORT, "r3", expected_size_bytes=DISK, connections=2, timeout_s=timeout_s,
                         keep_sockets=first == "cut")
        blockdev.write_at(dev.path, 0, b"\x33" * MiB)          # the link works
        assert modules.load("tcp_diag") is None                # as the primary's daemon does at its start
        lab.loss("s", 100)
        results = []

        def writer(at):
            t0 = time.monotonic()
            try:
                blockdev.write_at(dev.path, at, b"\x44" * (4 * MiB))
                results.append(("ok", time.monotonic() - t0))
            except OSError as e:
                results.append((e.errno, time.monotonic() - t0))

        threads = [threading.Thread(target=writer, args=(at,), daemon=True) for at in (8 * MiB, 16 * MiB, 24 * MiB)]
        for t in threads:
            t.start()
        time.sleep(1.0)                                        # the senders are blocked by now
        assert not results, results
        t0 = time.monotonic()
        if first == "cut":
            cut(dev)
        elif first == "abort":
            with lab.inside("p"):                              # sock_diag answers in the sockets' namespace
                assert abort(dev.endpoints) == 2
        nl.disconnect(dev.index)
        took = time.monotonic() - t0
        for t in threads:
            t.join(timeout=60)
        print(f"disconnect took {took:.2f} s ({first} first); writes: {results}")
        assert not any(t.is_alive() for t in threads)
        assert [r[0] for r in results] == [errno.EIO] * 3, results
        if first:
            assert took < 1.0, took
        # Alone it took 7.3 and 15.6 s on 6.1.0-56 (docs/kernel-notes.md): printed, not asserted,
        # so that a kernel which stops waiting there does not fail the suite.
    finally:
        lab.loss("s", 0)
        if dev is not None:
            with contextlib.suppress(netlink.NBDNetlinkError):
                nl.disconnect(dev.index)
            poll.wait_for(lambda: nl.is_connected(dev.index), "nbd disconnect", ok=lambda v: not v)
            cut(dev)
        nl.close()
        export.kill()
        export.wait()
