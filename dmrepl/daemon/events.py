"""A resource's events: STATE_DIR/NAME/events.jsonl, one JSON object a line, for scripts.

Either role's daemon appends what changed -- a state move, a checkpoint, the primary connected or
lost, a resync's phase, an early checkpoint asked for, start and stop -- and `dmrepl events NAME`
follows the file (`--history` first prints what it holds).  A file, not the daemon's socket: the
secondary's commands act without a daemon, events outlive a daemon's restart, and a reader can
never slow a daemon down.  Each line:

    {"time": 1795810000.123, "resource": "vm1", "role": "primary", "event": "state",
     "state": "degraded", "previous": "replicating", "cause": "heartbeat-missed", "reason": "..."}

At MAX_BYTES the file moves to events.jsonl.1 (one generation kept) and a new one starts.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator

from dmrepl import private

FILE = "events.jsonl"
MAX_BYTES = 1 << 20


def path_of(resource_state_dir: str) -> str:
    return os.path.join(resource_state_dir, FILE)


class EventLog:
    def __init__(self, resource_state_dir: str, name: str, role: str):
        self.path = path_of(resource_state_dir)
        self.name, self.role = name, role
        self._lock = threading.Lock()      # the link thread and the main loop both emit

    def emit(self, event: str, **fields) -> dict:
        record = {"time": round(time.time(), 3), "resource": self.name, "role": self.role, "event": event,
                  **fields}
        line = json.dumps(record) + "\n"
        with self._lock:
            try:
                self._append(line)
            except (OSError, private.NotPrivate):
                pass        # a full disk or a widened directory must not stop replication
        return record

    def _append(self, line: str) -> None:
        try:
            if os.path.getsize(self.path) + len(line) > MAX_BYTES:
                os.replace(self.path, self.path + ".1")
        except FileNotFoundError:
            pass
        with private.open_file(self.path, "a") as f:
            f.write(line)


class Follower:
    """New lines of one resource's events file, across its rotation and re-creation."""

    def __init__(self, resource_state_dir: str, history: bool):
        self.path = path_of(resource_state_dir)
        self.f = None
        self.inode = None
        self.partial = ""
        self._open(at_end=not history)
        if history and os.path.exists(self.path + ".1"):
            with open(self.path + ".1") as old:
                self.pending = old.readlines()
        else:
            self.pending = []

    def _open(self, at_end: bool) -> None:
        try:
            f = open(self.path)
        except FileNotFoundError:
            self.f, self.inode = None, None
            return
        if at_end:
            f.seek(0, os.SEEK_END)
        self.f, self.inode, self.partial = f, os.fstat(f.fileno()).st_ino, ""

    def lines(self) -> Iterator[str]:
        """The complete lines written since the last call."""
        yield from self.pending
        self.pending = []
        if self.f is None:
            self._open(at_end=False)           # the daemon has made it since
            if self.f is None:
                return
        yield from self._read()
        try:
            moved = os.stat(self.path).st_ino != self.inode
        except FileNotFoundError:
            moved = False
        if moved:                              # rotated: the rest of the old file, then the new one
            yield from self._read()
            self.f.close()
            self._open(at_end=False)
            if self.f is not None:
                yield from self._read()

    def _read(self) -> Iterator[str]:
        data = self.partial + self.f.read()
        *complete, self.partial = data.split("\n")
        for line in complete:
            if line:
                yield line + "\n"

    def close(self) -> None:
        if self.f is not None:
            self.f.close()
