"""Typed kernel errors: errno, the call that failed and the object it acted on."""

import errno as _errno
import os


class KernelError(OSError):
    """A system call refused by the kernel.

    str() reads ``CALL OBJECT: strerror (ENAME)[: detail]``, for instance
    ``DM_TABLE_LOAD dmrepl-vm1-hidden: Device or resource busy (EBUSY)``.
    Callers branch on ``.errno``, never on the text.
    """

    def __init__(self, err: int, call: str, obj: str | None = None, detail: str | None = None):
        super().__init__(err, os.strerror(err) if err else "failed")
        self.call = call
        self.obj = obj
        self.detail = detail

    def __str__(self) -> str:
        name = _errno.errorcode.get(self.errno, str(self.errno))
        where = f"{self.call} {self.obj}" if self.obj else self.call
        text = f"{where}: {self.strerror} ({name})"
        if self.detail:
            text += f": {self.detail}"
        return text

    def __reduce__(self):
        return (type(self), (self.errno, self.call, self.obj, self.detail))


class DMError(KernelError):
    """A device-mapper ioctl failed."""


class LoopError(KernelError):
    """A loop device ioctl failed."""


class BlockDeviceError(KernelError):
    """A block device call (open, ioctl, read, write) failed."""
