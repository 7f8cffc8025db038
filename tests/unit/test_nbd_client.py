"""NBD client against nbdkit and against scripted fake servers (unit tier: host, no root).

All traffic stays on 127.0.0.1.  nbdkit's memory plugin is the well-behaved
server; the fake servers send what nbdkit never would (bad magic, cut-off or
stalled replies, wrong handles) and must make the client fail fast.
"""

import errno
import re
import shutil
import socket
import struct
import subprocess
import threading
import time

import pytest

from dmrepl.nbd.client import NBDClient
from dmrepl.nbd.handshake import handshake
from dmrepl.nbd.protocol import (
    IHAVEOPT,
    MAX_REQUEST_BYTES,
    NBD_CMD_DISC,
    NBD_CMD_READ,
    NBD_FLAG_C_FIXED_NEWSTYLE,
    NBD_FLAG_C_NO_ZEROES,
    NBD_FLAG_FIXED_NEWSTYLE,
    NBD_FLAG_HAS_FLAGS,
    NBD_FLAG_NO_ZEROES,
    NBD_FLAG_READ_ONLY,
    NBD_FLAG_SEND_FLUSH,
    NBD_FLAG_SEND_FUA,
    NBD_FLAG_SEND_TRIM,
    NBD_INFO_EXPORT,
    NBD_OPT_GO,
    NBD_REP_ACK,
    NBD_REP_ERR_UNKNOWN,
    NBD_REP_INFO,
    NBD_REQUEST_MAGIC,
    NBD_SIMPLE_REPLY_MAGIC,
    NBD_STRUCTURED_REPLY_MAGIC,
    NBDMAGIC,
    OPTION_REPLY_MAGIC,
    ExportInfo,
    NBDError,
    NBDOptionError,
    NBDProtocolError,
)

MiB = 1024 * 1024
EXPORT_BYTES = 64 * MiB
LOCALHOST = "127.0.0.1"
NBDKIT = shutil.which("nbdkit")
START_TIMEOUT_S = 10.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((LOCALHOST, 0))
        return s.getsockname()[1]


def _wait_until_listening(proc: subprocess.Popen, port: int, log_path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"nbdkit exited with {proc.returncode}: {log_path.read_text()}")
        try:
            socket.create_connection((LOCALHOST, port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    pytest.fail(f"nbdkit did not listen on {LOCALHOST}:{port} within {START_TIMEOUT_S} s: "
                f"{log_path.read_text()}")


@pytest.fixture
def nbdkit(tmp_path):
    """Factory: start nbdkit on 127.0.0.1 with the given plugin/filter arguments, return its port.

    Every server started is stopped and reaped at teardown, whatever the test did.
    """
    if NBDKIT is None:
        pytest.skip("nbdkit is not installed; these tests use it as the reference NBD server")
    started = []

    def start(*args: str) -> int:
        port = _free_port()
        log_path = tmp_path / f"nbdkit-{port}.log"
        with open(log_path, "wb") as log:
            argv = [NBDKIT, "-f", "--exit-with-parent", "-i", LOCALHOST, "-p", str(port), *args]
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        started.append(proc)
        _wait_until_listening(proc, port, log_path)
        return port

    yield start
    for proc in started:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def memory_port(nbdkit):
    return nbdkit("memory", f"size={EXPORT_BYTES}")


def pattern(seed: int, length: int) -> bytes:
    """Bytes that differ with seed and position, so a misplaced chunk shows."""
    unit = bytes((seed * 31 + i) % 251 for i in range(251))
    return (unit * (length // len(unit) + 1))[:length]


# -- against nbdkit -----------------------------------------------------------------------------------------

def test_handshake_reports_size_and_flags(memory_port):
    with NBDClient.connect(LOCALHOST, memory_port) as client:
        assert client.info.size_bytes == EXPORT_BYTES
        assert not client.info.read_only
        assert client.info.can_flush and client.info.can_trim


def test_handshake_on_own_socket_leaves_it_in_transmission(memory_port):
    sock = socket.create_connection((LOCALHOST, memory_port), timeout=5)
    info = handshake(sock)
    assert info.size_bytes == EXPORT_BYTES
    with NBDClient(sock, info) as client:
        assert client.read(0, 512) == bytes(512)


def test_write_read_back_and_zeroes_elsewhere(memory_port):
    writes = [(0, pattern(1, 4096)), (4096 + 17, pattern(2, 1000)), (1 * MiB, pattern(3, 128 * 1024)),
              (EXPORT_BYTES - 512, pattern(4, 512))]
    with NBDClient.connect(LOCALHOST, memory_port) as client:
        for offset, data in writes:
            client.write(offset, data)
        for offset, data in writes:
            assert client.read(offset, len(data)) == data
        assert client.read(8192, 4096) == bytes(4096)
        assert client.read(2 * MiB, 64 * 1024) == bytes(64 * 1024)


def test_large_write_and_read_are_split(nbdkit, tmp_path):
    log_path = tmp_path / "requests.log"
    port = nbdkit("--filter=log", "memory", f"size={EXPORT_BYTES}", f"logfile={log_path}")
    data = pattern(5, 40 * MiB)
    with NBDClient.connect(LOCALHOST, port) as client:
        client.write(8 * MiB, data)
        assert client.read(8 * MiB, len(data)) == data
    log = log_path.read_text()
    requests = re.findall(r"(?:Write|Read) id=\d+ offset=0x[0-9a-f]+ count=(0x[0-9a-f]+)", log)
    counts = [int(count, 16) for count in requests]
    assert counts == [MAX_REQUEST_BYTES, 8 * MiB, MAX_REQUEST_BYTES, 8 * MiB]


def test_flush_and_fua_write(memory_port):
    with NBDClient.connect(LOCALHOST, memory_port) as client:
        assert client.info.can_fua  # nbdkit's memory plugin advertises FUA
        client.write(0, b"fua", fua=True)
        client.flush()
        assert client.read(0, 3) == b"fua"


def test_trim_reads_back_zeroes(memory_port):
    with NBDClient.connect(LOCALHOST, memory_port) as client:
        client.write(0, pattern(6, 1 * MiB))
        client.trim(256 * 1024, 256 * 1024)
        data = client.read(0, 1 * MiB)
    assert data[256 * 1024:512 * 1024] == bytes(256 * 1024)  # the memory plugin zeroes trimmed ranges
    assert data[:256 * 1024] == pattern(6, 1 * MiB)[:256 * 1024]
    assert data[512 * 1024:] == pattern(6, 1 * MiB)[512 * 1024:]


def test_close_leaves_server_running_for_next_connection(memory_port):
    client = NBDClient.connect(LOCALHOST, memory_port)
    client.write(0, b"persist")
    client.close()
    client.close()  # twice is fine
    with pytest.raises(ValueError, match="closed"):
        client.read(0, 1)
    with NBDClient.connect(LOCALHOST, memory_port) as again:
        assert again.read(0, 7) == b"persist"


def test_server_error_keeps_errno_and_connection(nbdkit):
    port = nbdkit("--filter=error", "memory", "size=1M", "error=EIO", "error-pread-rate=100%")
    with NBDClient.connect(LOCALHOST, port) as client:
        with pytest.raises(NBDError) as e:
            client.read(4096, 512)
        assert e.value.errno == errno.EIO
        assert str(e.value) == "NBD_CMD_READ offset 4096 length 512: Input/output error (EIO)"
        client.write(0, b"still usable")  # an error reply leaves the stream in step


def test_unknown_export_name_is_refused(nbdkit):
    port = nbdkit("--filter=exportname", "memory", "size=1M", "exportname-strict=true", "exportname=vm1")
    with NBDClient.connect(LOCALHOST, port, "vm1") as client:
        assert client.info.size_bytes == 1 * MiB
    with pytest.raises(NBDOptionError) as e:
        NBDClient.connect(LOCALHOST, port, "vm2")
    assert e.value.reply == NBD_REP_ERR_UNKNOWN
    assert e.value.errno == errno.ENOENT
    assert str(e.value).startswith("NBD_OPT_GO export 'vm2': export not found (NBD_REP_ERR_UNKNOWN)")


# -- capability and range checks: refused before anything is sent --------------------------------------------

@pytest.mark.parametrize("flags,call,missing", [
    (0, lambda c: c.write(0, b"x", fua=True), "NBD_FLAG_SEND_FUA"),
    (0, lambda c: c.flush(), "NBD_FLAG_SEND_FLUSH"),
    (0, lambda c: c.trim(0, 512), "NBD_FLAG_SEND_TRIM"),
    (NBD_FLAG_READ_ONLY, lambda c: c.write(0, b"x"), "NBD_FLAG_READ_ONLY"),
    (NBD_FLAG_SEND_FLUSH | NBD_FLAG_SEND_FUA | NBD_FLAG_SEND_TRIM, lambda c: c.read(MiB - 1, 2), "outside"),
], ids=["fua", "flush", "trim", "read-only", "range"])
def test_refused_without_capability(flags, call, missing):
    ours, theirs = socket.socketpair()
    with ours, theirs:
        client = NBDClient(ours, ExportInfo(1 * MiB, NBD_FLAG_HAS_FLAGS | flags))
        with pytest.raises(ValueError, match=missing):
            call(client)
        theirs.setblocking(False)
        with pytest.raises(BlockingIOError):
            theirs.recv(1)  # nothing went on the wire


# -- fake servers: what nbdkit never sends ------------------------------------------------------------------

class FakeServer:
    """Accepts one connection on 127.0.0.1 and runs script(conn) on it in a thread."""

    def __init__(self, script):
        self.listener = socket.create_server((LOCALHOST, 0))
        self.listener.settimeout(5)
        self.port = self.listener.getsockname()[1]
        self.received = bytearray()
        self.thread = threading.Thread(target=self._serve, args=(script,), daemon=True)
        self.thread.start()

    def _serve(self, script):
        try:
            conn, _ = self.listener.accept()
        except OSError:
            return
        with conn:
            conn.settimeout(5)
            try:
                script(self, conn)
            except OSError:
                pass

    def recv_exact(self, conn, length: int) -> bytes:
        data = b""
        while len(data) < length:
            chunk = conn.recv(length - len(data))
            if not chunk:
                break
            data += chunk
        self.received += data
        return data

    def negotiate(self, conn, size_bytes: int = 1 * MiB, flags: int = NBD_FLAG_HAS_FLAGS,
                  handshake_flags: int = NBD_FLAG_FIXED_NEWSTYLE) -> None:
        """Play a well-behaved server up to the transmission phase."""
        conn.sendall(struct.pack("!QQH", NBDMAGIC, IHAVEOPT, handshake_flags))
        self.recv_exact(conn, 4)
        _, option, length = struct.unpack("!QII", self.recv_exact(conn, 16))
        self.recv_exact(conn, length)
        info = struct.pack("!HQH", NBD_INFO_EXPORT, size_bytes, flags)
        conn.sendall(struct.pack("!QIII", OPTION_REPLY_MAGIC, option, NBD_REP_INFO, len(info)) + info
                     + struct.pack("!QIII", OPTION_REPLY_MAGIC, option, NBD_REP_ACK, 0))

    def stop(self):
        self.listener.close()
        self.thread.join(10)


@pytest.fixture
def fake_server():
    servers = []

    def start(script) -> FakeServer:
        servers.append(FakeServer(script))
        return servers[-1]

    yield start
    for server in servers:
        server.stop()


def _fails_fast(port: int, call=None, timeout: float = 1.0) -> str:
    """Connect (and run call) expecting NBDProtocolError well within a few seconds; return its message."""
    started = time.monotonic()
    with pytest.raises(NBDProtocolError) as e:
        with NBDClient.connect(LOCALHOST, port, timeout=timeout) as client:
            call(client)
    assert time.monotonic() - started < timeout + 2
    return str(e.value)


@pytest.mark.parametrize("offered,expected", [
    (NBD_FLAG_FIXED_NEWSTYLE, NBD_FLAG_C_FIXED_NEWSTYLE),
    (NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES, NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES),
], ids=["fixed-newstyle", "no-zeroes"])
def test_handshake_wire_format(fake_server, offered, expected):
    server = fake_server(lambda s, conn: s.negotiate(conn, handshake_flags=offered))
    with NBDClient.connect(LOCALHOST, server.port, "vm1", timeout=5) as client:
        assert client.info == ExportInfo(1 * MiB, NBD_FLAG_HAS_FLAGS)
    server.thread.join(5)
    go_data = struct.pack("!I", 3) + b"vm1" + struct.pack("!H", 0)  # no information requests
    # Client flags, then NBD_OPT_GO as the only option: structured replies are never asked for.
    assert bytes(server.received) == (struct.pack("!I", expected)
                                      + struct.pack("!QII", IHAVEOPT, NBD_OPT_GO, len(go_data)) + go_data)


def test_bad_greeting_magic(fake_server):
    server = fake_server(lambda s, conn: (conn.sendall(b"NOTMAGIC" + bytes(10)), s.recv_exact(conn, 1)))
    message = _fails_fast(server.port)
    assert f"expected {NBDMAGIC:#x}, received {int.from_bytes(b'NOTMAGIC', 'big'):#x}" in message


def test_server_without_fixed_newstyle(fake_server):
    server = fake_server(lambda s, conn: (conn.sendall(struct.pack("!QQH", NBDMAGIC, IHAVEOPT, 0)),
                                          s.recv_exact(conn, 1)))
    assert "NBD_FLAG_FIXED_NEWSTYLE" in _fails_fast(server.port)


def test_server_closes_mid_handshake(fake_server):
    def script(s, conn):
        conn.sendall(struct.pack("!QQH", NBDMAGIC, IHAVEOPT, NBD_FLAG_FIXED_NEWSTYLE))
        s.recv_exact(conn, 4 + 16 + 4 + 2)  # client flags, NBD_OPT_GO header, empty name, no info requests
        conn.sendall(struct.pack("!Q", OPTION_REPLY_MAGIC))  # 8 of the 20 header bytes, then hang up

    server = fake_server(script)
    message = _fails_fast(server.port)
    assert "expected 20 bytes of option reply header, received 8 before the server closed" in message
    assert struct.unpack_from("!QII", server.received, 4)[:2] == (IHAVEOPT, NBD_OPT_GO)


def _reply_then(tail: bytes, hang_up: bool = True, handle_delta: int = 0,
                magic: int = NBD_SIMPLE_REPLY_MAGIC):
    """Script: negotiate, take one request, answer with a reply header plus tail, then hang up or stall."""
    def script(s, conn):
        s.negotiate(conn)
        _, _, _, handle, _, _ = struct.unpack("!IHHQQI", s.recv_exact(conn, 28))
        conn.sendall(struct.pack("!IIQ", magic, 0, handle + handle_delta) + tail)
        if not hang_up:
            s.recv_exact(conn, 1)  # stall until the client gives up and closes
    return script


@pytest.mark.parametrize("script,expected", [
    (_reply_then(b"x" * 100), "expected 512 bytes of NBD_CMD_READ data, received 100 before the server"),
    (_reply_then(b"x" * 100, hang_up=False), "received 100 before the 0.5 s timeout"),
    (_reply_then(b"", handle_delta=1), "NBD_CMD_READ handle 1, received one for handle 2"),
    (_reply_then(b"", magic=NBD_STRUCTURED_REPLY_MAGIC), "received a structured reply"),
    (_reply_then(b"", magic=0xDEADBEEF), "expected 0x67446698, received 0xdeadbeef"),
], ids=["closed-mid-data", "stalled-mid-data", "wrong-handle", "structured", "bad-magic"])
def test_bad_transmission_reply(fake_server, script, expected):
    server = fake_server(script)
    assert expected in _fails_fast(server.port, lambda c: c.read(0, 512), timeout=0.5)


def test_close_sends_disconnect(fake_server):
    def script(s, conn):
        s.negotiate(conn)
        s.recv_exact(conn, 28)

    server = fake_server(script)
    NBDClient.connect(LOCALHOST, server.port, timeout=5).close()
    server.thread.join(5)
    handshake_bytes = 4 + 16 + 4 + 2  # client flags, NBD_OPT_GO header, empty name, no info requests
    assert len(server.received) == handshake_bytes + 28
    request = struct.unpack_from("!IHHQQI", server.received, handshake_bytes)
    assert request == (NBD_REQUEST_MAGIC, 0, NBD_CMD_DISC, 1, 0, 0)


def test_read_request_wire_format(fake_server):
    def script(s, conn):
        s.negotiate(conn)
        _, _, _, handle, _, length = struct.unpack("!IHHQQI", s.recv_exact(conn, 28))
        conn.sendall(struct.pack("!IIQ", NBD_SIMPLE_REPLY_MAGIC, 0, handle) + b"a" * length)
        s.recv_exact(conn, 28)

    server = fake_server(script)
    with NBDClient.connect(LOCALHOST, server.port, timeout=5) as client:
        assert client.read(4096, 3) == b"aaa"
    server.thread.join(5)
    request = struct.unpack_from("!IHHQQI", server.received, len(server.received) - 56)
    assert request == (NBD_REQUEST_MAGIC, 0, NBD_CMD_READ, 1, 4096, 3)
