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


def _check(path: str, st: os.stat_result, widest: int, kind: str, *, error: type[DmreplError] = None,
           reach: str = "reach it", owners: tuple[int, ...] | None = None, after: str = "check who changed it",
           chmod: str | None = None) -> None:
    """Refuse `st` if its mode has a bit beyond `widest` or it belongs to a uid other than `owners`
    (default: this process's)."""
    error = error or NotPrivate
    mode = stat.S_IMODE(st.st_mode)
    if mode & ~widest & 0o777:
        raise error(f"{kind} {path} is mode {mode:04o}: group or others can {reach}",
                    f"chmod {chmod or f'{widest:o}'} {path}, and {after}")
    if st.st_uid not in (owners or (os.geteuid(),)):
        who = "root or this process's uid" if owners else "this process's uid"
        raise error(f"{kind} {path} belongs to uid {st.st_uid}, not to {who} ({os.geteuid()})",
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


def read_secret(path: str, kind: str, error: type[DmreplError] = None, missing: str | None = None) -> str:
    """The text of a secret (a key file): a regular file that only this process's user can read;
    `missing` is the hint when there is no such file."""
    error = error or NotPrivate
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK)
    except FileNotFoundError:
        raise error(f"{kind} {path} does not exist", missing) from None
    except OSError as e:
        raise error(f"{kind} {path}: cannot read: {e.strerror}") from None
    with os.fdopen(fd, "r") as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise error(f"{kind} {path} is not a regular file")
        _check(path, st, 0o600, kind, error=error, reach="read it", after="change the key: it may have been read")
        return f.read()


def check_writers(path: str, st: os.stat_result, kind: str, error: type[DmreplError] = None) -> None:
    """A file that says what dmrepl may overwrite: only root or this process's user may change it."""
    _check(path, st, 0o755, kind, error=error, reach="change it", owners=(0, os.geteuid()), chmod="go-w")


def write_secret(path: str, text: str, replace: bool = True) -> None:
    """`text` in `path`, mode 0600, written whole or not at all (temporary file, fsync, rename);
    with replace=False an existing file is kept and FileExistsError raised."""
    tmp = f"{path}.tmp.{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, text.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    if replace:
        os.rename(tmp, path)
        return
    try:
        os.link(tmp, path)          # fails if the path exists: never a key overwritten
    finally:
        os.unlink(tmp)
