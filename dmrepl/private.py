"""Files only root may read: a resource's state directory (0700) and what dmrepl writes in it
(state, pid files, logs, the resync's log: 0600).  A directory or file found wider is refused,
not silently narrowed: whoever could read or change it may already have."""

from __future__ import annotations

import os
import stat
from typing import IO

from dmrepl.errors import DmreplError


class NotPrivate(DmreplError):
    pass


def _check(path: str, st: os.stat_result, widest: int, kind: str) -> None:
    mode = stat.S_IMODE(st.st_mode)
    if mode & ~widest & 0o777:
        raise NotPrivate(f"{kind} {path} is mode {mode:04o}: group or others can reach it",
                         f"chmod {widest:o} {path}, and check who changed it")
    if st.st_uid != os.geteuid():
        raise NotPrivate(f"{kind} {path} belongs to uid {st.st_uid}, not to this process's uid {os.geteuid()}",
                         f"chown root: {path}")


def ensure_dir(path: str) -> None:
    """The directory, made 0700 if missing; refused if it is wider or another user's."""
    os.makedirs(path, mode=0o700, exist_ok=True)
    check_dir(path)


def check_dir(path: str) -> None:
    _check(path, os.stat(path), 0o700, "directory")


def check_file(path: str) -> None:
    """Refused if the file exists and is wider than 0600 or another user's."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return
    _check(path, st, 0o600, "file")


def open_file(path: str, mode: str = "ab") -> IO:
    """open(path, mode) for "w", "wb", "a" or "ab", creating the file 0600 (an existing one is
    checked first)."""
    flags = {"w": os.O_WRONLY | os.O_TRUNC, "a": os.O_WRONLY | os.O_APPEND}[mode[0]]
    check_file(path)
    fd = os.open(path, flags | os.O_CREAT | os.O_CLOEXEC, 0o600)
    return os.fdopen(fd, mode)
