"""Persistent resource state, written atomically (temp file, fsync, rename, fsync dir, 0600).

The kernel is the source of truth for what is running; this file holds what
the kernel forgets across a power loss: the role, the checkpoint number, which
hidden store is current, whether a merge is in progress.
"""

from __future__ import annotations

import fcntl
import json
import os
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace

from dmrepl import private
from dmrepl.roles.transitions import Role

STATE_FILE = "state.json"
LOCK_FILE = "lock"
FORMAT = 1



class StateError(RuntimeError):
    pass


@dataclass(frozen=True)
class ResourceState:
    name: str
    resource_id: str
    role: str = Role.SECONDARY.value   # dmrepl.roles.transitions.Role
    checkpoint: int = 0
    current_store: int = 0          # index into hidden_stores
    checkpoint_lost: bool = False   # the kernel invalidated the hidden store
    early_checkpoint_requested: bool = False
    format: int = FORMAT
    history: list = field(default_factory=list)  # last checkpoints/failovers, newest last
    # What this host changed since the last checkpoint it shared with its peer that its era history
    # does not tell, kept until a checkpoint joins the hosts again: after a failover, the chunks the
    # merge rolled back or the consumer wrote ({"checkpoint", "era", "ranges"}); after `resolve
    # --discard-my-data`, every byte this host wrote as primary since then ({"checkpoint", "ranges"}).
    diverged: dict | None = None
    # The replicated device's length, both roles' tables are built at it: recorded at the first start,
    # changed by `dmrepl resize` only (a disk grown under a running stack must not change the tables
    # by itself). None in states written before online grow: the disk's size.
    size_bytes: int | None = None
    # A switchover this host (the primary) asked its secondary to go through with, until it knows the
    # outcome ({"checkpoint", "to", "time"}): while set, this host does not start as primary blindly.
    handover: dict | None = None

    def evolve(self, **changes) -> "ResourceState":
        return replace(self, **changes)

    def era_of(self, checkpoint: int) -> int | None:
        """The earliest era this host recorded for `checkpoint` (primary history), None if none."""
        eras = [h["era"] for h in self.history if h.get("checkpoint") == checkpoint and isinstance(h.get("era"), int)]
        return min(eras) if eras else None


class StateStore:
    def __init__(self, directory: str):
        self.directory = directory
        self.path = os.path.join(directory, STATE_FILE)

    @contextmanager
    def locked(self):
        """Hold an exclusive flock for a read-modify-write of the state.

        The daemon (store watch) and the CLI (checkpoint, failover) both update
        the state; without the lock the daemon could write back a checkpoint
        number and store index that a checkpoint had just replaced.
        """
        private.ensure_dir(self.directory)
        fd = os.open(os.path.join(self.directory, LOCK_FILE), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def exists(self) -> bool:
        return os.path.exists(self.path)

    def load(self) -> ResourceState | None:
        if not os.path.exists(self.path):
            return None
        private.check_dir(self.directory)
        private.check_file(self.path)
        try:
            with open(self.path, encoding="utf-8") as f:
                raw = json.load(f)
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            raise StateError(f"{self.path}: unreadable state ({e}); move it away to start afresh") from None
        if raw.get("format") != FORMAT:
            raise StateError(f"{self.path}: state format {raw.get('format')!r}, this dmrepl reads {FORMAT}")
        if raw.get("role") not in {r.value for r in Role}:
            raise StateError(f"{self.path}: unknown role {raw.get('role')!r}")
        known = set(ResourceState.__dataclass_fields__)
        return ResourceState(**{k: v for k, v in raw.items() if k in known})

    def save(self, state: ResourceState) -> None:
        private.ensure_dir(self.directory)
        tmp = f"{self.path}.tmp.{os.getpid()}"
        data = dict(asdict(state))
        data["history"] = data["history"][-20:]
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, (json.dumps(data, indent=1, sort_keys=True) + "\n").encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, self.path)
        dfd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

    def remove(self) -> None:
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
