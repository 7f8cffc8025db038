"""The secondary's NBD listener with a gate: each connection is checked before a byte of NBD is
spoken, then served by an `nbdkit -s` of its own (issue 11, point 1).

    accept -> admit(source address) -> refused: closed at once, logged with its source
                                    -> admitted: `nbdkit -s` on the socket with the export name
                                       the authenticated control link handed to the primary
                                       (exportname filter, strict: another name, the resource
                                       id or an earlier session's name, is refused during the
                                       handshake, before any data moves)

Why not nbdkit's own listener with its ip filter: Debian 12's nbdkit 1.32.5 parses no address
rule (docs/kernel-notes.md), and the address to allow is only known once the primary has proved
the key on the control link.  A connection admitted in one control session outlives it: it is
the primary kernel's, and a dead or restarting primary daemon must not stall its consumer's
writes (kill -9 of it under load: tests/kernel/test_faults.py).  `drop_all` (the daemon stops) and
the fence of a failover (supervisor.fence) kill every server the gate admitted.
"""

from __future__ import annotations

import ipaddress
import secrets
import socket
import subprocess
import threading
from dataclasses import dataclass
from typing import Callable

from dmrepl import tools
from dmrepl.daemon.export import ExportError


class Refused(Exception):
    """Why a connection is not served (the log line names its source with it)."""


def nbdkit_single(device: str, export_name: str) -> list[str]:
    """nbdkit serving one connection on its stdin/stdout."""
    tool = tools.NBDKIT.path()
    if tool is None:
        raise ExportError(f"nbdkit is not installed (apt-get install {tools.NBDKIT.package})")
    return [tool, "--single", "--exit-with-parent", "--filter=exportname", "file", f"file={device}",
            f"exportname={export_name}", "exportname-strict=true"]


def new_export_name() -> str:
    """A session's export name: 192 random bits, so that knowing the resource id is not enough."""
    return "dmrepl-" + secrets.token_urlsafe(24)


def _norm(address: str) -> str:
    ip = ipaddress.ip_address(address.split("%")[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return str(ip)


class Admission:
    """Who may connect now: the address the authenticated control session came from, with that
    session's export name, while the resource expects its primary (not after a fence)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.peer: str | None = None
        self.name: str | None = None
        self.fenced: str | None = None

    def open(self, peer_address: str) -> str:
        """A control session authenticated from `peer_address`: its new export name."""
        with self.lock:
            self.peer, self.name = _norm(peer_address), new_export_name()
            return self.name

    def close(self) -> None:
        with self.lock:
            self.peer = self.name = None

    def fence(self, why: str) -> None:
        with self.lock:
            self.fenced = why

    def __call__(self, source: str) -> str:
        with self.lock:
            if self.fenced:
                raise Refused(self.fenced)
            if self.peer is None or self.name is None:
                raise Refused("no authenticated control session (the primary proves the key there first)")
            if _norm(source) != self.peer:
                raise Refused(f"not the primary of the authenticated control session ({self.peer})")
            return self.name


@dataclass
class Served:
    source: str
    proc: subprocess.Popen


class NbdGate:
    def __init__(self, host: str, port: int, device: str, admit: Callable[[str], str],
                 log: Callable[[str], None], on_change: Callable[[list[int]], None] = lambda pids: None):
        """`admit(source address)` returns the export name to serve, or raises Refused;
        `on_change(pids)` hears the servers' pids whenever they change (the fence kills them)."""
        self.host, self.port, self.device, self.admit, self.log = host, port, device, admit, log
        self.on_change = on_change
        self.sock: socket.socket | None = None
        self.served: list[Served] = []
        self.gone: list[Served] = []       # servers that ended on their own, not yet reported
        self.lock = threading.Lock()
        self.thread: threading.Thread | None = None

    def start(self) -> None:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.host, self.port))
        except OSError as e:
            sock.close()
            raise ExportError(f"cannot listen on {self.host}:{self.port}: {e.strerror}") from None
        sock.listen(16)
        self.sock = sock
        self.thread = threading.Thread(target=self._accept, name="nbd-gate", daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, addr = self.sock.accept()
            except OSError:
                return      # closed
            with conn:
                try:
                    name = self.admit(addr[0])
                    self._serve(conn, addr[0], name)
                except Refused as why:
                    self.log(f"NBD connection from {addr[0]}:{addr[1]} refused: {why}")
                except (OSError, ExportError) as e:
                    self.log(f"NBD connection from {addr[0]}:{addr[1]} could not be served: {e}")

    def _serve(self, conn: socket.socket, source: str, name: str) -> None:
        # nbdkit gets the socket as stdin and stdout; this process's copy closes with `conn`.
        proc = subprocess.Popen(nbdkit_single(self.device, name), stdin=conn.fileno(), stdout=conn.fileno(),
                                close_fds=True)
        with self.lock:         # pid lists reach on_change in the order they were made
            self.served.append(Served(source, proc))
            self.on_change([s.proc.pid for s in self.served])

    def serving(self) -> list[Served]:
        """The servers still running (those that ended are reaped)."""
        with self.lock:
            ended = [s for s in self.served if s.proc.poll() is not None]
            self.served = [s for s in self.served if s not in ended]
            self.gone += ended
            if ended:
                self.on_change([s.proc.pid for s in self.served])
            return list(self.served)

    def ended(self) -> list[Served]:
        """Servers that ended on their own (their client left, or they died) since the last call."""
        self.serving()
        with self.lock:
            gone, self.gone = self.gone, []
        return gone

    def drop_all(self, why: str) -> int:
        """Kill every admitted server (their connections close); returns how many ran."""
        with self.lock:
            running, self.served = [s for s in self.served if s.proc.poll() is None], []
            for s in running:
                s.proc.kill()
            for s in running:
                s.proc.wait()
            self.on_change([])
        if running:
            sources = ", ".join(sorted({s.source for s in running}))
            self.log(f"NBD: {len(running)} connection(s) from {sources} closed: {why}")
        return len(running)

    def close(self) -> None:
        if self.sock is not None:
            try:
                self.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self.sock.close()
        if self.thread is not None:
            self.thread.join(timeout=5)
        self.drop_all("the export stops")
