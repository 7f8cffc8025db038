"""device-mapper through /dev/mapper/control, without libdevmapper or dmsetup.

Every ioctl passes through `Control._do_ioctl`: it fills the header, grows the
data buffer when the kernel sets DM_BUFFER_FULL_FLAG, and turns a refusal into
a `DMError` that names the ioctl and the device.  The public methods carry the
ioctl's name in their docstring and accept only the flags that ioctl takes.

Kernel reference: include/uapi/linux/dm-ioctl.h, drivers/md/dm-ioctl.c.
"""

from __future__ import annotations

import errno
import os
import select
import time
from dataclasses import dataclass
from typing import Iterable, Protocol

from dmrepl import _kernel
from dmrepl.kernel import nodes, udev
from dmrepl.kernel.errors import DMError

CONTROL_PATH = "/dev/mapper/control"
MAPPER_DIR = nodes.MAPPER_DIR

_F = _kernel.DM_FLAGS
_REQ = _kernel.DM_REQUESTS
_INITIAL_BUFFER = 16 * 1024
_MAX_BUFFER = 16 * 1024 * 1024


class TargetLine(Protocol):
    """What DM_TABLE_LOAD needs of one table line (dmrepl.kernel.tables.Target has it)."""

    start: int  # sectors
    length: int  # sectors
    target_type: str

    def params(self) -> str: ...


@dataclass(frozen=True)
class Spec:
    """One raw table or status line as the kernel returns it; sectors throughout."""

    start: int
    length: int
    target_type: str
    text: str  # the parameters (table) or the status string (status)

    def params(self) -> str:
        return self.text


@dataclass(frozen=True)
class DeviceInfo:
    """DM_DEV_STATUS: what the kernel says about one mapped device."""

    name: str
    uuid: str
    major: int
    minor: int
    open_count: int
    event_nr: int
    target_count: int
    suspended: bool
    read_only: bool
    live_table: bool
    inactive_table: bool
    # DM_DEFERRED_REMOVE in a status reply: removal is queued until the last
    # opener closes the device (dm-ioctl.c: __dev_status).
    deferred_remove: bool = False

    @property
    def path(self) -> str:
        return os.path.join(MAPPER_DIR, self.name)

    @property
    def dm_path(self) -> str:
        return f"/dev/dm-{self.minor}"

    @property
    def devno(self) -> str:
        """"MAJOR:MINOR", how a table names a device without depending on a /dev node."""
        return f"{self.major}:{self.minor}"


@dataclass(frozen=True)
class DeviceEntry:
    """One row of DM_LIST_DEVICES."""

    name: str
    major: int
    minor: int
    uuid: str


def validate_name(name: str) -> None:
    """Reject names the kernel (dm-ioctl.c: check_name, invalid_str) would refuse."""
    if not name:
        raise ValueError("device-mapper name is empty")
    if "/" in name or name in (".", ".."):
        raise ValueError(f"device-mapper name {name!r} may not contain '/' or be '.' or '..'")
    if len(name.encode()) >= _kernel.NAME_LEN:
        raise ValueError(f"device-mapper name {name!r} is longer than {_kernel.NAME_LEN - 1} bytes")
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise ValueError(f"device-mapper name {name!r} contains control characters")


def format_table(targets: Iterable[TargetLine]) -> str:
    return "\n".join(f"{t.start} {t.length} {t.target_type} {t.params()}" for t in targets)


class Control:
    """An open /dev/mapper/control.  Use as a context manager, or call close()."""

    def __init__(self, path: str = CONTROL_PATH):
        try:
            self._fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            raise DMError(e.errno, "open", path,
                          "device-mapper is not available (load dm-mod, or run inside the test VM)") from None
        self.path = path

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> "Control":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def fileno(self) -> int:
        return self._fd

    # -- the one choke point ------------------------------------------------

    def _do_ioctl(self, call: str, name: str | None = None, *, uuid: str | None = None,
                  flags: int = 0, event_nr: int = 0, payload: bytes = b"",
                  target_count: int = 0, detail: str | None = None) -> dict:
        request = _REQ[call]
        size = _INITIAL_BUFFER
        while True:
            try:
                reply = _kernel.dm_call(self._fd, request, name, uuid, flags, event_nr, 0,
                                        target_count, payload, size)
            except OSError as e:
                raise DMError(e.errno, call, name, detail) from None
            except ValueError as e:
                raise DMError(errno.EINVAL, call, name, str(e)) from None
            if not reply["flags"] & _F["BUFFER_FULL"]:
                return reply
            if size >= _MAX_BUFFER:
                raise DMError(errno.ENOSPC, call, name, f"reply larger than {_MAX_BUFFER} bytes")
            size *= 2

    @staticmethod
    def _info(reply: dict) -> DeviceInfo:
        flags = reply["flags"]
        dev = reply["dev"]
        return DeviceInfo(
            name=reply["name"], uuid=reply["uuid"],
            major=os.major(dev), minor=os.minor(dev),
            open_count=reply["open_count"], event_nr=reply["event_nr"],
            target_count=reply["target_count"],
            suspended=bool(flags & _F["SUSPEND"]), read_only=bool(flags & _F["READONLY"]),
            live_table=bool(flags & _F["ACTIVE_PRESENT"]),
            inactive_table=bool(flags & _F["INACTIVE_PRESENT"]),
            deferred_remove=bool(flags & _F["DEFERRED_REMOVE"]),
        )

    # -- global calls -------------------------------------------------------

    def version(self) -> tuple[int, int, int]:
        """DM_VERSION: the kernel's ioctl interface version."""
        return self._do_ioctl("DM_VERSION")["version"]

    def list_devices(self) -> list[DeviceEntry]:
        """DM_LIST_DEVICES (with DM_UUID_FLAG: uuids from interface 4.46 on)."""
        reply = self._do_ioctl("DM_LIST_DEVICES", flags=_F["UUID"])
        out = []
        for name, dev, _event_nr, uuid in _kernel.unpack_name_list(reply["data"]):
            if uuid is None:
                try:
                    uuid = self.info(name).uuid
                except DMError as e:
                    if e.errno == errno.ENXIO:
                        continue  # removed while we listed
                    raise
            out.append(DeviceEntry(name, os.major(dev), os.minor(dev), uuid))
        return out

    def list_target_versions(self) -> dict[str, tuple[int, int, int]]:
        """DM_LIST_VERSIONS: the targets registered now (modules not loaded are absent)."""
        reply = self._do_ioctl("DM_LIST_VERSIONS")
        return dict(_kernel.unpack_versions(reply["data"]))

    # -- device calls -------------------------------------------------------

    def create(self, name: str, uuid: str) -> DeviceInfo:
        """DM_DEV_CREATE: a device without a table.

        /dev/mapper/NAME exists afterwards when no udev runs; with udev it
        appears at the first resume (udev names only devices with a table).
        """
        validate_name(name)
        if udev.running():
            udev.settle()
        info = self._info(self._do_ioctl("DM_DEV_CREATE", name, uuid=uuid))
        nodes.ensure(info)
        return info

    def load(self, name: str, targets: Iterable[TargetLine]) -> DeviceInfo:
        """DM_TABLE_LOAD into the inactive slot; resume() makes it live."""
        targets = list(targets)
        if not targets:
            raise DMError(errno.EINVAL, "DM_TABLE_LOAD", name, "empty table")
        specs = [(t.start, t.length, t.target_type, t.params()) for t in targets]
        table = format_table(targets)
        reply = self._do_ioctl("DM_TABLE_LOAD", name, payload=_kernel.pack_targets(specs),
                               target_count=len(specs), detail=f"table: {table!r}")
        return self._info(reply)

    def clear(self, name: str) -> DeviceInfo:
        """DM_TABLE_CLEAR: drop the inactive table."""
        return self._info(self._do_ioctl("DM_TABLE_CLEAR", name))

    def suspend(self, name: str, *, flush: bool = True, lockfs: bool = True) -> DeviceInfo:
        """DM_DEV_SUSPEND with DM_SUSPEND_FLAG.

        flush=True waits for in-flight I/O and flushes (the checkpoint's quiesce);
        flush=False sets DM_NOFLUSH_FLAG (I/O is queued, not completed).
        lockfs=False sets DM_SKIP_LOCKFS_FLAG (no filesystem freeze).
        """
        flags = _F["SUSPEND"]
        if not flush:
            flags |= _F["NOFLUSH"]
        if not lockfs:
            flags |= _F["SKIP_LOCKFS"]
        return self._info(self._do_ioctl("DM_DEV_SUSPEND", name, flags=flags))

    def resume(self, name: str) -> DeviceInfo:
        """DM_DEV_SUSPEND without DM_SUSPEND_FLAG: swap in a loaded table, restart I/O."""
        info = self._info(self._do_ioctl("DM_DEV_SUSPEND", name))
        nodes.ensure(info)
        return info

    def remove(self, name: str, *, busy_timeout: float = 10.0, delay: float = 0.05,
               deferred: bool = False) -> None:
        """DM_DEV_REMOVE, retried on EBUSY for up to `busy_timeout` seconds.

        udev's blkid probe holds a fresh device open briefly; on a loaded host
        "briefly" stretches, so the bound is time, not a number of attempts.
        deferred=True sets DM_DEFERRED_REMOVE: an open device is removed when
        its last opener closes it instead of failing with EBUSY.
        """
        flags = _F["DEFERRED_REMOVE"] if deferred else 0
        deadline = time.monotonic() + busy_timeout
        while True:
            try:
                self._do_ioctl("DM_DEV_REMOVE", name, flags=flags)
                break
            except DMError as e:
                if e.errno != errno.EBUSY or time.monotonic() >= deadline:
                    raise
                time.sleep(delay)
        nodes.drop(name)

    def info(self, name: str) -> DeviceInfo:
        """DM_DEV_STATUS."""
        return self._info(self._do_ioctl("DM_DEV_STATUS", name))

    def exists(self, name: str) -> bool:
        try:
            self.info(name)
            return True
        except DMError as e:
            if e.errno == errno.ENXIO:
                return False
            raise

    def status(self, name: str) -> list[Spec]:
        """DM_TABLE_STATUS: one status line per target of the live table."""
        reply = self._do_ioctl("DM_TABLE_STATUS", name)
        return [Spec(*t) for t in _kernel.unpack_targets(reply["data"], reply["target_count"])]

    def table(self, name: str, *, inactive: bool = False) -> list[Spec]:
        """DM_TABLE_STATUS with DM_STATUS_TABLE_FLAG: the table lines as loaded."""
        flags = _F["STATUS_TABLE"]
        if inactive:
            flags |= _F["QUERY_INACTIVE_TABLE"]
        reply = self._do_ioctl("DM_TABLE_STATUS", name, flags=flags)
        return [Spec(*t) for t in _kernel.unpack_targets(reply["data"], reply["target_count"])]

    def deps(self, name: str) -> list[tuple[int, int]]:
        """DM_TABLE_DEPS: (major, minor) of the devices the live table uses."""
        reply = self._do_ioctl("DM_TABLE_DEPS", name)
        return [(os.major(d), os.minor(d)) for d in _kernel.unpack_deps(reply["data"])]

    def message(self, name: str, message: str, *, sector: int = 0) -> str:
        """DM_TARGET_MSG to the target at `sector`; returns the target's reply text."""
        reply = self._do_ioctl("DM_TARGET_MSG", name, payload=_kernel.pack_message(sector, message),
                               detail=f"message {message!r}")
        if reply["flags"] & _F["DATA_OUT"]:
            return reply["data"].split(b"\0", 1)[0].decode(errors="replace")
        return ""

    def dev_wait(self, name: str, event_nr: int) -> DeviceInfo:
        """DM_DEV_WAIT: block (GIL released) until the device's event counter passes event_nr."""
        return self._info(self._do_ioctl("DM_DEV_WAIT", name, event_nr=event_nr))

    def arm_events(self) -> None:
        """DM_DEV_ARM_POLL: from now on this fd turns readable (select, poll) at the next event of
        any dm device -- a mirror leg failing, a snapshot invalidated (dm-ioctl.c: dm_poll).  Arm
        again after it was readable, before reading the states that changed."""
        self._do_ioctl("DM_DEV_ARM_POLL")

    def wait_event(self, name: str, event_nr: int, timeout: float | None = None) -> DeviceInfo | None:
        """Wait until the event counter of `name` differs from event_nr, or the timeout.

        Uses DM_DEV_ARM_POLL: the control fd turns readable on the next event of
        any device after arming (dm-ioctl.c: dm_poll), so a timeout is possible,
        unlike DM_DEV_WAIT.  Returns the new info, or None on timeout.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        poller = select.poll()
        poller.register(self._fd, select.POLLIN)
        while True:
            self.arm_events()
            info = self.info(name)
            if info.event_nr != event_nr:
                return info
            if deadline is None:
                poller.poll()
                continue
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            poller.poll(left * 1000)


def remove_tree(ctl: Control, names: Iterable[str]) -> list[str]:
    """Remove devices in an order that respects their stacking; returns the names removed.

    Suspended devices are resumed first, so that no I/O stays queued on them.
    Devices that other devices still use fail with EBUSY; they are retried after
    their users went away.  Used by teardown paths that must clean up whatever failed.
    """
    pending = [n for n in names if ctl.exists(n)]
    for name in pending:
        try:
            if ctl.info(name).suspended:
                ctl.resume(name)
        except DMError:
            pass  # removal is still attempted
    removed = []
    while pending:
        progress = False
        for name in list(pending):
            try:
                ctl.remove(name, busy_timeout=0)
            except DMError as e:
                if e.errno == errno.ENXIO:
                    pending.remove(name)
                    continue
                if e.errno != errno.EBUSY:
                    raise
                continue
            pending.remove(name)
            removed.append(name)
            progress = True
        if not progress and pending:
            # Last round with the normal EBUSY retries, then give up loudly.
            for name in list(pending):
                ctl.remove(name)
                pending.remove(name)
                removed.append(name)
    return removed
