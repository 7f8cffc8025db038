"""The daemon's local control socket: how `dmrepl status|checkpoint|down NAME` reach a running daemon.

    STATE_DIR/NAME/control.sock    (directory 0700, socket 0600; callers must be root)

One JSON object per line each way: {"op": "status"} -> {"ok": true, ...} or
{"ok": false, "error": "...", "hint": "..."}.  A caller that is not root (the
peer's credentials, SO_PEERCRED), a line that is not JSON, an unknown op or a
request over MAX_REQUEST bytes gets an error reply and changes nothing.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import threading
from typing import Callable

from dmrepl.errors import DmreplError

SOCKET_NAME = "control.sock"
MAX_REQUEST = 4096
CLIENT_TIMEOUT = 120.0


def socket_path(resource_state_dir: str) -> str:
    return os.path.join(resource_state_dir, SOCKET_NAME)


class DaemonNotRunning(DmreplError):
    pass


def _peer_uid(conn: socket.socket) -> int:
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)[1]


class ControlServer:
    """Serves requests in a thread; `handle(request) -> reply dict` may raise DmreplError."""

    def __init__(self, path: str, handle: Callable[[dict], dict], log: Callable[[str], None]):
        self.path, self.handle, self.log = path, handle, log
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        if os.path.exists(path):
            if _accepts(path):
                raise DmreplError(f"another daemon answers on {path}", "stop it first (`dmrepl down`)")
            os.unlink(path)  # left by a daemon that was killed
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        old = os.umask(0o177)
        try:
            self.sock.bind(path)
        finally:
            os.umask(old)
        self.sock.listen(8)
        self._busy = 0                  # requests being answered
        self._idle = threading.Condition()
        self._thread = threading.Thread(target=self._serve, name="control", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return  # closed
            threading.Thread(target=self._one, args=(conn,), name="control-request", daemon=True).start()

    def _one(self, conn: socket.socket) -> None:
        with self._idle:
            self._busy += 1
        try:
            self._reply(conn)
        finally:
            with self._idle:
                self._busy -= 1
                self._idle.notify_all()

    def drain(self, timeout: float) -> bool:
        """Wait until every request taken has had its reply sent (before the process runs another
        program: a switchover's caller must hear how it went); False at `timeout`."""
        with self._idle:
            return self._idle.wait_for(lambda: self._busy == 0, timeout)

    def _reply(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(10.0)
            try:
                reply = self._answer(conn)
            except OSError:
                return
            try:
                conn.sendall((json.dumps(reply) + "\n").encode())
            except OSError:
                pass

    def _answer(self, conn: socket.socket) -> dict:
        uid = _peer_uid(conn)
        if uid != 0 and uid != os.geteuid():
            self.log(f"control socket: refused a request from uid {uid}")
            return {"ok": False, "error": "the dmrepl daemon answers root only", "hint": "run it with sudo"}
        data = b""
        while not data.endswith(b"\n"):
            chunk = conn.recv(MAX_REQUEST + 1 - len(data))
            if not chunk:
                break
            data += chunk
            if len(data) > MAX_REQUEST:
                return {"ok": False, "error": f"request longer than {MAX_REQUEST} bytes"}
        try:
            request = json.loads(data)
            if not isinstance(request, dict) or not isinstance(request.get("op"), str):
                raise ValueError("no op")
        except ValueError:
            self.log("control socket: a request that is not a JSON object with an 'op': refused")
            return {"ok": False, "error": "not a request (one JSON object with an 'op' per line)"}
        try:
            return {"ok": True, **self.handle(request)}
        except DmreplError as e:
            return {"ok": False, "error": str(e), "hint": e.hint}
        except Exception as e:  # noqa: BLE001 -- the caller must hear why, whatever it was
            self.log(f"control socket: {request['op']} failed: {type(e).__name__}: {e}")
            return {"ok": False, "error": f"{type(e).__name__}: {e}"}

    def close(self) -> None:
        self.sock.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


def _accepts(path: str) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(path)
            return True
        except OSError:
            return False


def request(path: str, op: str, *, timeout: float = CLIENT_TIMEOUT, **args) -> dict:
    """Ask the daemon; returns its reply, raises DmreplError with its error and hint."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    s.settimeout(timeout)
    with s:
        try:
            s.connect(path)
        except (FileNotFoundError, ConnectionRefusedError):
            raise DaemonNotRunning(f"no daemon answers on {path}", "start it with `dmrepl up NAME`") from None
        s.sendall((json.dumps({"op": op, **args}) + "\n").encode())
        data = b""
        while not data.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    try:
        reply = json.loads(data)
    except ValueError:
        raise DmreplError(f"the daemon on {path} closed without a reply", "see its log") from None
    if not reply.get("ok"):
        raise DmreplError(reply.get("error", "the daemon refused"), reply.get("hint"))
    return reply
