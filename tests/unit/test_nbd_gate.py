"""The secondary's NBD gate: only the authenticated primary's address, only with its session's
export name, each connection served by an nbdkit of its own (unit tier: a file, loopback)."""

import shutil
import socket
import time

import pytest

from dmrepl.daemon.gate import Admission, NbdGate, Refused
from dmrepl.nbd import handshake
from dmrepl.nbd.client import NBDClient
from dmrepl.nbd.protocol import NBDOptionError, NBDProtocolError

pytestmark = pytest.mark.skipif(not shutil.which("nbdkit"), reason="nbdkit is not installed")

KiB = 1024


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def gate(tmp_path):
    disk = tmp_path / "s.img"
    disk.write_bytes(b"\x11" * (256 * KiB))
    admission, logged = Admission(), []
    g = NbdGate("127.0.0.1", _free_port(), str(disk), admission, logged.append)
    g.start()
    yield g, admission, disk, logged
    g.close()


def _client(g: NbdGate, name: str, source: str = "127.0.0.1") -> NBDClient:
    sock = socket.socket()
    sock.settimeout(10)
    sock.bind((source, 0))
    sock.connect((g.host, g.port))
    return NBDClient(sock, handshake.handshake(sock, name))


def _closed_at_once(g: NbdGate, source: str) -> bool:
    with socket.socket() as sock:
        sock.settimeout(10)
        sock.bind((source, 0))
        sock.connect((g.host, g.port))
        return sock.recv(64) == b""          # not even the NBD greeting


def test_the_primary_writes_with_its_session_name(gate):
    g, admission, disk, logged = gate
    name = admission.open("127.0.0.1")
    with _client(g, name) as c:
        c.write(8 * KiB, b"\x22" * 4 * KiB)
        c.flush()
        assert c.read(4 * KiB, 12 * KiB) == b"\x11" * 4 * KiB + b"\x22" * 4 * KiB + b"\x11" * 4 * KiB
    assert disk.read_bytes()[8 * KiB:12 * KiB] == b"\x22" * 4 * KiB
    assert logged == []


def test_no_session_another_address_or_a_fence_is_refused_before_the_greeting(gate):
    g, admission, disk, logged = gate
    before = disk.read_bytes()
    assert _closed_at_once(g, "127.0.0.1")                        # no control session yet
    admission.open("127.0.0.1")
    assert _closed_at_once(g, "127.0.0.3")                        # an intruder on the same link
    admission.fence("the secondary took over (failover): its export is fenced")
    assert _closed_at_once(g, "127.0.0.1")
    deadline = time.monotonic() + 5
    while len(logged) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert [line.split(" refused: ")[0].rsplit(":", 1)[0] for line in logged] == [
        "NBD connection from 127.0.0.1", "NBD connection from 127.0.0.3", "NBD connection from 127.0.0.1"]
    assert "no authenticated control session" in logged[0]
    assert "not the primary of the authenticated control session (127.0.0.1)" in logged[1]
    assert "fenced" in logged[2]
    assert disk.read_bytes() == before


@pytest.mark.parametrize("asked", ["resource-id", "", "earlier"])
def test_another_export_name_is_refused_in_the_handshake(gate, asked):
    g, admission, disk, _logged = gate
    earlier = admission.open("127.0.0.1")
    admission.open("127.0.0.1")                                   # a new session: a new name
    with pytest.raises(NBDOptionError):
        _client(g, earlier if asked == "earlier" else asked)
    assert disk.read_bytes() == b"\x11" * (256 * KiB)


def test_drop_all_closes_the_admitted_connections(gate):
    g, admission, _disk, logged = gate
    name = admission.open("127.0.0.1")
    c = _client(g, name)
    assert len(g.serving()) == 1
    assert g.drop_all("failover") == 1
    with pytest.raises((OSError, NBDProtocolError)):      # the server is gone: EOF or a reset
        c.read(0, 4 * KiB)
    c.close()
    assert g.serving() == [] and logged[-1] == "NBD: 1 connection(s) from 127.0.0.1 closed: failover"


def test_admission_compares_addresses_not_spellings():
    a = Admission()
    name = a.open("::ffff:192.0.2.10")
    assert a("192.0.2.10") == name
    with pytest.raises(Refused):
        a("192.0.2.11")
    a.close()
    with pytest.raises(Refused, match="no authenticated control session"):
        a("192.0.2.10")


def test_a_hello_carries_a_valid_export_name_or_none():
    from dmrepl.roles.hello import Hello

    h = Hello("vm1", "secondary", 1 << 20, 8, 128, [2], export_name="dmrepl-abc")
    assert Hello.from_wire(h.to_wire()).export_name == "dmrepl-abc"
    assert Hello.from_wire({**h.to_wire(), "export_name": None}).export_name is None
    for bad in ("", 7, "x" * 257, "a\nb"):
        with pytest.raises(ValueError):
            Hello.from_wire({**h.to_wire(), "export_name": bad})
