"""The daemon's local control socket: requests, errors and garbage (unit tier, no root)."""

import os
import socket
import stat

import pytest

from dmrepl.daemon import control
from dmrepl.errors import DmreplError


@pytest.fixture
def server(tmp_path):
    seen, logged = [], []

    def handle(req):
        seen.append(req)
        if req["op"] == "checkpoint":
            raise DmreplError("resource vm1 is disconnected", "see status")
        if req["op"] == "crash":
            raise KeyError("boom")
        return {"state": "replicating", "n": req.get("n")}

    srv = control.ControlServer(control.socket_path(str(tmp_path / "vm1")), handle, logged.append)
    yield srv, seen, logged
    srv.close()


def _raw(path, data: bytes) -> bytes:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(5)
        s.connect(path)
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        return s.recv(65536)


def test_a_request_and_its_reply(server):
    srv, seen, _ = server
    assert control.request(srv.path, "status", n=3) == {"ok": True, "state": "replicating", "n": 3}
    assert seen == [{"op": "status", "n": 3}]
    assert stat.S_IMODE(os.stat(srv.path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(os.path.dirname(srv.path)).st_mode) == 0o700


def test_a_refusal_reaches_the_caller_with_its_hint(server):
    srv, _, _ = server
    with pytest.raises(DmreplError) as e:
        control.request(srv.path, "checkpoint")
    assert str(e.value) == "resource vm1 is disconnected" and e.value.hint == "see status"
    with pytest.raises(DmreplError) as e:
        control.request(srv.path, "crash")
    assert "KeyError" in str(e.value)


@pytest.mark.parametrize("data", [b"garbage\n", b"[1, 2]\n", b'{"no": "op"}\n', b"\xff\xfe\n"])
def test_garbage_gets_an_error_and_changes_nothing(server, data):
    srv, seen, logged = server
    assert b'"ok": false' in _raw(srv.path, data)
    assert seen == [] and logged


def test_an_oversized_request_is_refused(server):
    srv, seen, _ = server
    assert b"longer than 4096 bytes" in _raw(srv.path, b"x" * 10000)
    assert seen == []


def test_no_daemon_is_a_clear_error(tmp_path):
    with pytest.raises(control.DaemonNotRunning) as e:
        control.request(str(tmp_path / "control.sock"), "status")
    assert "no daemon answers on" in str(e.value) and "dmrepl up" in e.value.hint


def test_a_second_daemon_is_refused_and_a_stale_socket_replaced(server, tmp_path):
    srv, _, _ = server
    with pytest.raises(DmreplError) as e:
        control.ControlServer(srv.path, dict, print)
    assert "another daemon answers" in str(e.value)
    stale = str(tmp_path / "stale" / "control.sock")
    os.makedirs(os.path.dirname(stale))
    s = socket.socket(socket.AF_UNIX)
    s.bind(stale)
    s.close()                                 # a socket file with nobody behind it
    srv2 = control.ControlServer(stale, lambda r: {"fine": 1}, print)
    try:
        assert control.request(stale, "status")["fine"] == 1
    finally:
        srv2.close()
