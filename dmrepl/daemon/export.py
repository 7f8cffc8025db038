"""The secondary's NBD export: nbdkit serving the origin device.

Why nbdkit (Debian's package) rather than qemu-nbd: it is a small server with
no image-format layer, its file plugin passes NBD_CMD_FLUSH and FUA down as
fdatasync on the device (so a primary's flush reaches S), and its exportname
filter in strict mode refuses a peer that asks for another resource's export
during the handshake -- before any byte of data moves.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import time

from dmrepl import private, tools
from dmrepl.errors import DmreplError


class ExportError(DmreplError):
    """nbdkit cannot serve the export (missing, cannot listen, exited)."""


def nbdkit_argv(device: str, host: str, port: int, export_name: str) -> list[str]:
    tool = tools.NBDKIT.path()
    if tool is None:
        raise ExportError(f"nbdkit is not installed (apt-get install {tools.NBDKIT.package})")
    return [tool, "--foreground", "--exit-with-parent", "--ipaddr", host, "--port", str(port),
            "--filter=exportname", "file", f"file={device}",
            f"default-export={export_name}", f"exportname={export_name}", "exportname-strict=true"]


def port_accepts(host: str, port: int, timeout: float = 0.2) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


class Export:
    """One nbdkit process; start() returns once the port accepts connections."""

    def __init__(self, device: str, host: str, port: int, export_name: str, log_path: str | None = None):
        self.argv = nbdkit_argv(device, host, port, export_name)
        self.host, self.port = host, port
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 15.0) -> None:
        if port_accepts(self.host, self.port):
            raise ExportError(f"{self.host}:{self.port} is already in use by another server")
        # No log path: nbdkit inherits our stdout and stderr (the daemon log).
        log = private.open_file(self.log_path, "ab") if self.log_path else None
        try:
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        finally:
            if self.log_path:
                log.close()
        deadline = time.monotonic() + timeout
        while not port_accepts(self.host, self.port):
            if self.proc.poll() is not None:
                raise ExportError(f"nbdkit exited with status {self.proc.returncode} before listening "
                                  f"on {self.host}:{self.port}" + (f" (see {self.log_path})" if self.log_path else ""))
            if time.monotonic() > deadline:
                self.stop()
                raise ExportError(f"nbdkit did not listen on {self.host}:{self.port} within {timeout:.0f} s")
            time.sleep(0.05)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 5.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
