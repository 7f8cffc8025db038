"""The control link: authentication, framing, replay and forgery (unit tier, loopback TCP)."""

import os
import socket
import threading

import pytest

from dmrepl.link import auth, frames
from dmrepl.link.frames import FrameError, Kind
from dmrepl.link.session import Listener, Session

KEY = bytes(range(32))
OTHER = bytes(range(1, 33))


class Server:
    """A listener in a thread: records every session's messages or the reason it was refused."""

    def __init__(self, psk=KEY, replies=None):
        self.listener = Listener("127.0.0.1", 0, psk)
        self.got: list = []
        self.refused: list[str] = []
        self.replies = replies or {}
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    @property
    def port(self):
        return self.listener.port

    def _run(self):
        try:
            s = self.listener.accept(timeout=10)
        except FrameError as e:
            self.refused.append(str(e))
            return
        except OSError:
            return
        with s:
            while True:
                try:
                    kind, body = s.recv(timeout=10)
                except (FrameError, OSError) as e:
                    self.refused.append(str(e))
                    return
                self.got.append((kind, body))
                if kind in self.replies:
                    s.send(*self.replies[kind])

    def join(self):
        self.thread.join(timeout=20)
        self.listener.close()


def test_authenticated_session_carries_messages_both_ways():
    srv = Server(replies={Kind.HEARTBEAT: (Kind.HEARTBEAT, {"n": 2})})
    with Session.connect("127.0.0.1", srv.port, KEY) as s:
        s.send(Kind.HELLO, {"resource_id": "r1", "size_bytes": 1 << 20})
        s.send(Kind.HEARTBEAT, {"n": 1})
        assert s.recv(timeout=5) == (Kind.HEARTBEAT, {"n": 2})
    srv.join()
    assert srv.got == [(Kind.HELLO, {"resource_id": "r1", "size_bytes": 1 << 20}), (Kind.HEARTBEAT, {"n": 1})]


def test_wrong_key_is_refused_on_both_sides_and_nothing_is_delivered():
    srv = Server(psk=OTHER)
    with pytest.raises(auth.AuthError) as e:
        Session.connect("127.0.0.1", srv.port, KEY)
    assert "different keys" in str(e.value)
    srv.join()
    assert srv.got == []


def test_client_that_does_not_know_the_key_cannot_get_past_the_proof():
    """A client that copies the server's proof back (it cannot compute its own) is refused."""
    srv = Server()
    with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as sock:
        sock.sendall(frames.encode(Kind.CHALLENGE, {"nonce": os.urandom(32).hex()}, key=None, direction=b"", seq=0))
        _, body = frames.decode(sock, key=None, direction=b"", seq=0)
        sock.sendall(frames.encode(Kind.PROOF_REPLY, {"proof": body["proof"]}, key=None, direction=b"", seq=0))
        # and then a session frame it cannot MAC
        sock.sendall(frames.encode(Kind.CHECKPOINT, {"n": 1}, key=bytes(32), direction=b"c2s", seq=0))
    srv.join()
    assert srv.got == [] and "different keys" in srv.refused[0]


@pytest.mark.parametrize("garbage", [b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", os.urandom(4096), b""])
def test_garbage_is_refused_and_logged_with_the_peer(garbage):
    srv = Server()
    with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as sock:
        sock.sendall(garbage)
    srv.join()
    assert srv.got == [] and srv.refused and srv.refused[0].startswith("peer 127.0.0.1:")


def test_oversized_frame_is_refused_from_its_header():
    srv = Server()
    with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as sock:
        sock.sendall(frames.HEADER.pack(frames.MAGIC, frames.VERSION, Kind.CHALLENGE, 0, 1 << 30))
    srv.join()
    assert srv.got == [] and f"longer than {frames.MAX_PAYLOAD}: refused unread" in srv.refused[0]


def test_another_version_is_refused_with_a_hint():
    srv = Server()
    with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as sock:
        sock.sendall(frames.HEADER.pack(frames.MAGIC, 9, Kind.CHALLENGE, 0, 2) + b"{}" + bytes(32))
    srv.join()
    assert "control link version 9, this dmrepl speaks 1" in srv.refused[0]


class Tap:
    """A TCP relay that records what the client sends, to replay or tamper with it."""

    def __init__(self, target_port, tamper=None):
        self.srv = socket.create_server(("127.0.0.1", 0))
        self.port = self.srv.getsockname()[1]
        self.target_port = target_port
        self.tamper = tamper
        self.sent = bytearray()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        conn, _ = self.srv.accept()
        up = socket.create_connection(("127.0.0.1", self.target_port))
        done = threading.Event()

        def pump(a, b, record):
            try:
                while data := a.recv(65536):
                    if record:
                        self.sent.extend(data)
                        if self.tamper:
                            data = self.tamper(data)
                    b.sendall(data)
            except OSError:
                pass
            done.set()

        threading.Thread(target=pump, args=(up, conn, False), daemon=True).start()
        pump(conn, up, True)
        try:
            up.shutdown(socket.SHUT_WR)  # the client is done: let the server see the end at once
        except OSError:
            pass
        done.wait(5)
        for s in (conn, up):
            s.close()


def test_replayed_session_does_nothing():
    first = Server()
    tap = Tap(first.port)
    with Session.connect("127.0.0.1", tap.port, KEY) as s:
        s.send(Kind.CHECKPOINT, {"n": 7})
    first.join()
    tap.thread.join(5)
    assert first.got == [(Kind.CHECKPOINT, {"n": 7})]
    # The attacker replays every byte the client sent to a new session of the same server.
    second = Server()
    with socket.create_connection(("127.0.0.1", second.port), timeout=5) as sock:
        sock.sendall(bytes(tap.sent))
        try:
            sock.recv(4096)
        except OSError:
            pass
    second.join()
    assert second.got == [] and "different keys" in second.refused[0]


def test_forged_frame_in_a_session_does_nothing():
    """One bit flipped in the payload of a session frame: the MAC catches it, the session ends."""
    srv = Server()
    seen = {"n": 0}

    def flip(data: bytes) -> bytes:
        seen["n"] += 1
        if b'"n":7' in data:
            return data.replace(b'"n":7', b'"n":8')
        return data

    tap = Tap(srv.port, tamper=flip)
    with Session.connect("127.0.0.1", tap.port, KEY) as s:
        s.send(Kind.CHECKPOINT, {"n": 7})
    srv.join()
    assert srv.got == [] and "bad MAC" in srv.refused[0]


def test_key_file_checks(tmp_path):
    path = tmp_path / "psk"
    auth.write_new_key(str(path))
    assert oct(os.stat(path).st_mode & 0o777) == "0o600"
    assert len(auth.load_key(str(path))) == 32
    os.chmod(path, 0o644)
    with pytest.raises(auth.KeyFileError) as e:
        auth.load_key(str(path))
    assert str(e.value) == f"key file {path} is mode 0644: group or others can read it" and "chmod 600" in e.value.hint
    os.chmod(path, 0o600)
    path.write_text("abcd\n")
    with pytest.raises(auth.KeyFileError) as e:
        auth.load_key(str(path))
    assert "holds 2 bytes: at least 32" in str(e.value)
    path.write_text("not hex at all\n")
    with pytest.raises(auth.KeyFileError):
        auth.load_key(str(path))
    with pytest.raises(auth.KeyFileError) as e:
        auth.load_key(str(tmp_path / "missing"))
    assert "does not exist" in str(e.value)


def test_a_send_that_broke_the_session_is_what_a_later_recv_reports():
    # The primary's keepalive thread sends while its main thread waits to read: when the peer has
    # gone, the send closes the socket, and the read must say why, not "Bad file descriptor".
    listener = Listener("127.0.0.1", 0, KEY)
    accepted = []
    t = threading.Thread(target=lambda: accepted.append(listener.accept(timeout=10)), daemon=True)
    t.start()
    s = Session.connect("127.0.0.1", listener.port, KEY)
    t.join(timeout=10)
    accepted[0].close()                       # the peer ends the session
    with pytest.raises(OSError):
        for _ in range(100):
            s.send(Kind.HEARTBEAT, {"n": 1})
    with pytest.raises(ConnectionAbortedError, match="the session was closed: sending HEARTBEAT failed"):
        s.recv(timeout=1)
    with pytest.raises(ConnectionAbortedError, match="the session was closed: sending HEARTBEAT failed"):
        s.send(Kind.DIGESTS, {"offset": 0})
    listener.close()
