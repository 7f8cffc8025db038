"""systemd's service notifications (sd_notify(3)) without libsystemd: one datagram a message.

`systemd/dmrepl@.service` is Type=notify: the daemon says READY=1 once its stack and link are up
(the consumer's device exists), keeps STATUS= to its role, state and checkpoint (`systemctl
status dmrepl@NAME` shows it), says STOPPING=1 when it tears down, and extends the start timeout
while an initial sync copies (EXTEND_TIMEOUT_USEC, systemd 236).  Not under systemd (no
$NOTIFY_SOCKET), every call does nothing.
"""

from __future__ import annotations

import os
import socket
import threading

ENV = "NOTIFY_SOCKET"
_taken: str | None = None       # $NOTIFY_SOCKET, which from_environment took out (a switchover's next role needs it)


class Notifier:
    def __init__(self, path: str | None):
        """`path`: $NOTIFY_SOCKET (a file system path, or "@name" in the abstract namespace).
        The socket is made here, before the daemon enters its link's network namespace: an
        abstract address is one namespace's."""
        self.path = path
        self.last_status: str | None = None
        self._lock = threading.Lock()        # the link thread and the main loop both report
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) if path else None

    @classmethod
    def from_environment(cls) -> "Notifier":
        """Take $NOTIFY_SOCKET out of the environment: the processes this one starts (nbdkit) are
        not the service's main process and must not speak for it."""
        global _taken
        _taken = os.environ.pop(ENV, None) or _taken
        return cls(_taken)

    @property
    def active(self) -> bool:
        return self.path is not None

    def send(self, *fields: str) -> bool:
        """Send `fields` (KEY=VALUE, one a line); False when not under systemd or the send failed
        (a notification is never worth failing the daemon for)."""
        if self._sock is None:
            return False
        address = "\0" + self.path[1:] if self.path.startswith("@") else self.path
        with self._lock:
            try:
                self._sock.sendto("\n".join(fields).encode(), address)
            except OSError:
                return False
        return True

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def ready(self, status: str) -> bool:
        self.last_status = status
        return self.send("READY=1", f"STATUS={status}")

    def status(self, status: str) -> bool:
        if status == self.last_status:
            return False
        self.last_status = status
        return self.send(f"STATUS={status}")

    def stopping(self) -> bool:
        return self.send("STOPPING=1")

    def handing_over(self, status: str) -> bool:
        """This process runs `dmrepl up` again in its new role (a switchover): to systemd a reload,
        which the new role's READY=1 ends (STOPPING=1 would make it wait for an exit)."""
        self.last_status = status
        return self.send("RELOADING=1", f"STATUS={status}")

    def extend_start(self, seconds: float, status: str) -> bool:
        """More time to start (an initial sync that is making progress)."""
        self.last_status = status
        return self.send(f"EXTEND_TIMEOUT_USEC={int(seconds * 1e6)}", f"STATUS={status}")
