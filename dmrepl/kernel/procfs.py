"""Who holds a file or block device open: /proc/PID/fd scanned, compared by identity."""

from __future__ import annotations

import os
import stat


def _identity(st: os.stat_result) -> tuple:
    if stat.S_ISBLK(st.st_mode):
        return ("blk", st.st_rdev)
    return ("ino", st.st_dev, st.st_ino)


def openers(path: str, *, exclude_pids: tuple[int, ...] = (), include_self: bool = False) -> list[tuple[int, str]]:
    """(pid, command) of the processes with `path` open, other than `exclude_pids` and (unless
    include_self) this process."""
    want = _identity(os.stat(path))
    skip = {*exclude_pids} if include_self else {os.getpid(), *exclude_pids}
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) in skip:
            continue
        fd_dir = f"/proc/{pid}/fd"
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            continue
        for fd in fds:
            try:
                if _identity(os.stat(f"{fd_dir}/{fd}")) == want:
                    try:
                        with open(f"/proc/{pid}/comm") as f:
                            comm = f.read().strip()
                    except OSError:
                        comm = "?"
                    found.append((int(pid), comm))
                    break
            except OSError:
                continue
    return found


def describe(openers_: list[tuple[int, str]]) -> str:
    """"comm[pid], ..." for messages; "a process" when /proc showed none (it may be gone already)."""
    return ", ".join(f"{comm}[{pid}]" for pid, comm in openers_) or "a process"


def holders(dev_path: str) -> list[str]:
    """Kernel holders of a block device (/sys/dev/block/M:m/holders): dm devices stacked on it."""
    st = os.stat(dev_path)
    try:
        return sorted(os.listdir(f"/sys/dev/block/{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}/holders"))
    except FileNotFoundError:
        return []
