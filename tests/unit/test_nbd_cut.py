"""Cutting NBD connections: sock_diag's SOCK_DESTROY message and a real abort on loopback, and the
record of a dead daemon's connections (unit tier; the NBD side runs in the kernel tier's
tests/kernel/test_two_hosts.py and test_faults.py)."""

import json
import os
import socket
import struct
import time
import types

import pytest

from dmrepl.daemon import primary_link
from dmrepl.kernel import sockdiag
from dmrepl.nbd.attach import abort


def test_the_destroy_request_is_inet_diag_req_v2_for_the_exact_connection():
    msg = sockdiag._request(("10.0.0.1", 45678), ("10.0.0.2", 10809))
    length, kind, flags, seq, pid = struct.unpack_from("=IHHII", msg)
    assert (length, kind, flags, seq, pid) == (72, 21, 0x5, 1, 0) and len(msg) == 72
    family, proto, ext, states = struct.unpack_from("=BBBxI", msg, 16)
    assert (family, proto, ext, states) == (socket.AF_INET, socket.IPPROTO_TCP, 0, 0xFFFFFFFF)
    sport, dport = struct.unpack_from("!HH", msg, 24)
    assert (sport, dport) == (45678, 10809)
    assert msg[28:44] == bytes([10, 0, 0, 1]) + bytes(12) and msg[44:60] == bytes([10, 0, 0, 2]) + bytes(12)
    assert struct.unpack_from("=III", msg, 60) == (0, 0xFFFFFFFF, 0xFFFFFFFF)     # any interface, no cookie
    v6 = sockdiag._request(("fd00::1", 1), ("fd00::2", 2))
    assert v6[16] == socket.AF_INET6 and v6[28:44] == socket.inet_pton(socket.AF_INET6, "fd00::1")
    with pytest.raises(ValueError, match="two families"):
        sockdiag._request(("10.0.0.1", 1), ("fd00::2", 2))


@pytest.mark.skipif(os.geteuid() != 0, reason="SOCK_DESTROY needs CAP_NET_ADMIN")
def test_an_aborted_connection_fails_its_owner_at_once_and_is_gone():
    with socket.create_server(("127.0.0.1", 0)) as srv:
        client = socket.create_connection(srv.getsockname())
        server_side, _ = srv.accept()
        with client, server_side:
            ends = [(*client.getsockname(), *client.getpeername())]
            assert abort(ends) == 1
            client.settimeout(5)
            with pytest.raises(ConnectionAbortedError):
                client.recv(1)
            assert abort(ends) == 0                        # no such connection any more


def _cfg(tmp_path):
    os.makedirs(tmp_path / "vm1", mode=0o700)
    return types.SimpleNamespace(name="vm1", resource_state_dir=str(tmp_path / "vm1"), netns=None)


def test_a_dead_daemons_record_is_read_once_and_only_for_its_device(tmp_path):
    cfg = _cfg(tmp_path)
    path = os.path.join(cfg.resource_state_dir, primary_link.CONNECTIONS_FILE)
    assert primary_link._left_endpoints(cfg, 3) == ([], "no record of its connections")
    nbd = types.SimpleNamespace(index=3, endpoints=(("10.0.0.1", 40000, "10.0.0.2", 10809),))
    primary_link.remember_connections(cfg, nbd)
    assert oct(os.stat(path).st_mode & 0o777) == "0o600"
    assert primary_link._left_endpoints(cfg, 4) == ([], "the record is of /dev/nbd3, not /dev/nbd4")
    assert not os.path.exists(path)                       # used once, whatever it said
    primary_link.remember_connections(cfg, nbd)
    assert primary_link._left_endpoints(cfg, 3) == ([("10.0.0.1", 40000, "10.0.0.2", 10809)], "")
    assert not os.path.exists(path)


@pytest.mark.parametrize("text", ["not json", json.dumps({"index": 3}), json.dumps([1, 2])])
def test_an_unreadable_record_says_so_and_goes(tmp_path, text):
    cfg = _cfg(tmp_path)
    path = os.path.join(cfg.resource_state_dir, primary_link.CONNECTIONS_FILE)
    with open(path, "w") as f:
        f.write(text)
    endpoints, why = primary_link._left_endpoints(cfg, 3)
    assert endpoints == [] and why.startswith(f"its connections' record {path} is unreadable (")
    assert not os.path.exists(path)


def _pair_attached():
    a, b = socket.socketpair()
    return primary_link.Attached(index=0, info=None, connections=1, sockets=(a,)), b


class Dog(primary_link.Watchdog):
    """The NBD device's counters scripted: `step` added to the completed requests at each read."""

    POLL_S = 0.01

    def __init__(self, nbd, after_s, step=0, inflight=1):
        super().__init__(nbd, after_s, "a test's suspend")
        self.completed, self.step, self.inflight = 0, step, inflight

    def _counters(self):
        self.completed += self.step
        return self.completed, self.inflight


def test_a_watchdog_cuts_the_nbd_sockets_when_requests_in_flight_make_no_progress():
    nbd, peer_end = _pair_attached()
    with peer_end:
        with Dog(nbd, 0.05) as dog:
            time.sleep(0.3)                 # the ioctl that waits on the NBD leg
        assert dog.fired
        assert peer_end.recv(1) == b""      # the kernel's requests would fail now: the socket is shut down


@pytest.mark.parametrize("step, inflight", [(1, 1), (0, 0)], ids=["progress", "idle"])
def test_a_watchdog_cuts_nothing_while_the_device_progresses_or_waits_for_nothing(step, inflight):
    nbd, peer_end = _pair_attached()
    with peer_end:
        with Dog(nbd, 0.05, step=step, inflight=inflight) as dog:
            time.sleep(0.3)                 # a long flush of a live secondary
        assert not dog.fired
        nbd.sockets[0].send(b"x")
        assert peer_end.recv(1) == b"x"
        nbd.sockets[0].close()


def test_a_watchdog_disarmed_in_time_cuts_nothing():
    nbd, peer_end = _pair_attached()
    with peer_end:
        with Dog(nbd, 0.2) as dog:
            dog.disarm()                    # the flush ended; the peer's answer has its own timeout
            time.sleep(0.3)
        assert not dog.fired
        nbd.sockets[0].close()


def test_a_watchdog_without_an_nbd_device_does_nothing():
    with Dog(None, 0.01) as dog:
        time.sleep(0.05)
    assert not dog.fired
