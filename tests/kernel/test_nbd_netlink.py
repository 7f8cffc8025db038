"""The kernel NBD client driven over generic netlink (kernel tier): nbdkit serves a file,
/dev/nbdN is attached by dmrepl.nbd.attach, and every byte is checked on the file."""

import errno
import socket
import threading
import time

import pytest

from dmrepl import poll
from dmrepl.daemon.export import Export
from dmrepl.kernel import blockdev
from dmrepl.nbd import netlink
from dmrepl.nbd.attach import AttachError, attach, negotiate, ours, reconnect

MiB = 1 << 20
SIZE = 16 * MiB



@pytest.fixture
def served(tmp_path, free_port):
    """A 16 MiB file of 0x11 served by nbdkit as export 'r1' on a free port."""
    path = tmp_path / "s.img"
    with open(path, "wb") as f:
        f.write(b"\x11" * SIZE)
    export = Export(str(path), "127.0.0.1", free_port(), "r1")
    export.start()
    try:
        yield export, str(path)
    finally:
        export.stop()




def _file_bytes(path, off, n):
    with open(path, "rb") as f:
        f.seek(off)
        return f.read(n)


@pytest.mark.parametrize("connections", [1, 4])
def test_attach_write_read_disconnect(served, nl, connections):
    export, path = served
    n, attached = nl
    dev = attach(n, export.host, export.port, "r1", expected_size_bytes=SIZE, connections=connections)
    attached.append(dev.index)
    assert dev.info.size_bytes == SIZE and dev.info.can_multi_conn
    assert n.status(dev.index) == [netlink.DeviceState(dev.index, True)]
    assert ours() == {dev.index: "dmrepl:r1"}
    poll.wait_for(lambda: blockdev.size_bytes(dev.path), f"{dev.path} to show its size", ok=lambda v: v == SIZE)
    blockdev.write_at(dev.path, 3 * MiB, b"\x22" * MiB)       # O_DIRECT|O_DSYNC: on the server's file
    assert _file_bytes(path, 3 * MiB, MiB) == b"\x22" * MiB
    assert _file_bytes(path, 4 * MiB, 4096) == b"\x11" * 4096
    assert blockdev.read_at(dev.path, 3 * MiB - 4096, 8192) == b"\x11" * 4096 + b"\x22" * 4096
    n.disconnect(dev.index)
    poll.wait_for(lambda: n.is_connected(dev.index), f"{dev.path} to disconnect", ok=lambda v: not v)


def test_wrong_export_name_is_a_clear_error_and_attaches_nothing(served, nl):
    export, _ = served
    n, _ = nl
    with pytest.raises(AttachError) as e:
        attach(n, export.host, export.port, "someone-else", expected_size_bytes=SIZE)
    assert e.value.errno == errno.ENOENT
    assert "refused export name 'someone-else'" in str(e.value) and "same resource id" in str(e.value)
    assert ours() == {} and not any(d.connected for d in n.status())


def test_size_mismatch_is_a_clear_error_and_attaches_nothing(served, nl):
    export, _ = served
    n, _ = nl
    with pytest.raises(AttachError) as e:
        attach(n, export.host, export.port, "r1", expected_size_bytes=SIZE * 2)
    assert str(e.value) == (f"NBD export at 127.0.0.1:{export.port} is {SIZE} bytes, this host's disk is "
                            f"{SIZE * 2}: the two disks must be of one size")
    assert ours() == {} and not any(d.connected for d in n.status())


def test_refused_connection_and_garbage_server(nl, free_port):
    n, _ = nl
    port = free_port()
    with pytest.raises(AttachError) as e:
        attach(n, "127.0.0.1", port, "r1")
    assert e.value.errno == errno.ECONNREFUSED and "connection refused" in str(e.value)
    # A server that speaks something else: a protocol error, not a hang.
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()

    def talk():
        conn, _ = srv.accept()
        conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n" + bytes(64))
        time.sleep(0.5)
        conn.close()

    t = threading.Thread(target=talk)
    t.start()
    try:
        with pytest.raises(AttachError) as e:
            negotiate("127.0.0.1", srv.getsockname()[1], "r1", timeout_s=5)
        assert e.value.errno == errno.EPROTO and "broke the protocol" in str(e.value)
    finally:
        t.join()
        srv.close()


def test_link_dead_is_announced_and_reconfigure_brings_the_device_back(served, nl):
    """nbdkit killed: the kernel announces LINK_DEAD on nbd_mc_group; I/O waits at most
    dead_conn_timeout; a new socket handed over with RECONFIGURE makes it work again."""
    export, path = served
    n, attached = nl
    with netlink.LinkEvents() as events:
        dev = attach(n, export.host, export.port, "r1", expected_size_bytes=SIZE, timeout_s=1,
                     dead_conn_timeout_s=30)
        attached.append(dev.index)
        poll.wait_for(lambda: blockdev.size_bytes(dev.path), "size", ok=lambda v: v == SIZE)
        export.proc.kill()
        export.proc.wait()
        seen = poll.wait_for(lambda: events.wait(1.0), "NBD_CMD_LINK_DEAD on nbd_mc_group",
                             ok=lambda evs: any(e.cmd == netlink.Cmd.LINK_DEAD for e in evs))
        assert netlink.LinkEvent(netlink.Cmd.LINK_DEAD, dev.index) in seen
    # A write now waits for a new connection (dead_conn_timeout); reconnect while it waits.
    result = {}

    def writer():
        try:
            blockdev.write_at(dev.path, 5 * MiB, b"\x44" * 4096)
            result["ok"] = True
        except OSError as e:
            result["error"] = e

    t = threading.Thread(target=writer)
    t.start()
    export.start()
    reconnect(n, dev.index, export.host, export.port, "r1", expected_size_bytes=SIZE)
    t.join(timeout=30)
    assert not t.is_alive(), "the write hung after RECONFIGURE"
    assert result == {"ok": True}
    assert _file_bytes(path, 5 * MiB, 4096) == b"\x44" * 4096
    assert n.is_connected(dev.index)
