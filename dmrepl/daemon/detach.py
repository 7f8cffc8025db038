"""`dmrepl up NAME --detach`: the daemon in the background, returned from once it is ready.

For a caller without systemd -- a Pacemaker resource agent (ocf/dmrepl), an admin's shell.  The
child is the foreground daemon itself (`dmrepl up NAME`) in a session of its own, its output
appended to the resource's daemon.log, and it says it is ready the way it says so to systemd
(READY=1 on $NOTIFY_SOCKET, notify.py), to a socket of this process's.  EXTEND_TIMEOUT_USEC (an
initial sync making progress) moves the deadline as it would systemd's.  A child that exits
first, or is not ready in time, is an error with the last lines of its log; one not ready in
time is stopped first (SIGTERM: its own teardown), so nothing is left behind.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import tempfile
import time

from dmrepl import private
from dmrepl.errors import DmreplError

STOP_TIMEOUT = 90.0


def log_since(path: str, offset: int, lines: int = 12) -> str:
    """The last lines written to the log after `offset`: this start's, not an earlier run's."""
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            text = f.read().decode(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.strip().splitlines()[-lines:])


def _fields(datagram: bytes) -> dict[str, str]:
    return dict(line.split("=", 1) for line in datagram.decode(errors="replace").splitlines() if "=" in line)


def start(argv: list[str], log_path: str, timeout: float) -> tuple[int, str]:
    """Run `argv` (a daemon that notifies) detached; return (its pid, its STATUS= at READY=1)."""
    with tempfile.TemporaryDirectory(prefix="dmrepl-detach-") as tmp:
        path = os.path.join(tmp, "notify")
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.bind(path)
            with private.open_file(log_path, "ab") as log:
                offset = log.tell()
                proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, cwd="/",
                                        start_new_session=True, env={**os.environ, "NOTIFY_SOCKET": path})
            deadline = time.monotonic() + timeout
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    _stop(proc)
                    raise DmreplError(f"the daemon was not ready within {timeout:.0f} s and was stopped; its log "
                                      f"says:\n{log_since(log_path, offset)}", f"see {log_path}; a longer --timeout")
                sock.settimeout(min(0.5, left))
                try:
                    fields = _fields(sock.recv(4096))
                except socket.timeout:
                    # Only once nothing is queued: a READY=1 sent just before an exit still counts.
                    if proc.poll() is not None:
                        raise DmreplError(f"the daemon exited with status {proc.returncode} before it was ready; "
                                          f"its log says:\n{log_since(log_path, offset)}", f"see {log_path}") from None
                    continue
                if "EXTEND_TIMEOUT_USEC" in fields:
                    deadline = max(deadline, time.monotonic() + int(fields["EXTEND_TIMEOUT_USEC"]) / 1e6)
                if fields.get("READY") == "1":
                    return proc.pid, fields.get("STATUS", "")


def _stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
