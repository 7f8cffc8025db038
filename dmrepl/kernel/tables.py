"""Device-mapper table lines and status lines as typed values.

Each target formats its parameters (`params()`) and parses them back
(`from_params`); `parse_line(format_line(t)) == t` for every target.  Lengths
and offsets are in 512-byte sectors, as the kernel's tables are; field names
say so.  Status lines are in dmrepl.kernel.status.

Kernel references (Documentation/admin-guide/device-mapper/):
linear.rst, snapshot.rst, era.rst, dm-flakey.rst, delay.rst, and
drivers/md/dm-raid1.c (mirror), drivers/md/dm-snap.c (snapshot status).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

_REGISTRY: dict[str, type["Target"]] = {}


class TableError(ValueError):
    """A table or status line that does not parse."""


def _int(text: str, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise TableError(f"{what}: expected an integer, got {text!r}") from None
    if value < 0:
        raise TableError(f"{what}: must not be negative, got {value}")
    return value


def _need(words: list[str], n: int, target: str, usage: str) -> None:
    if len(words) < n:
        raise TableError(f"{target}: expected '{usage}', got {' '.join(words)!r}")


@dataclass(frozen=True)
class Target:
    """One table line: `<start> <length> <target_type> <params>` (sectors)."""

    start: int
    length: int
    target_type: ClassVar[str] = ""

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        if cls.target_type:
            _REGISTRY[cls.target_type] = cls

    def params(self) -> str:
        raise NotImplementedError

    @classmethod
    def from_params(cls, start: int, length: int, params: str) -> "Target":
        raise NotImplementedError

    def line(self) -> str:
        return f"{self.start} {self.length} {self.target_type} {self.params()}"


def parse_line(line: str) -> Target:
    """Parse `<start> <length> <type> <params...>` into its Target class."""
    words = line.split(None, 3)
    if len(words) < 3:
        raise TableError(f"table line {line!r}: expected '<start> <length> <type> <params>'")
    start = _int(words[0], "start sector")
    length = _int(words[1], "length in sectors")
    return from_spec(start, length, words[2], words[3] if len(words) > 3 else "")


def from_spec(start: int, length: int, target_type: str, params: str) -> Target:
    cls = _REGISTRY.get(target_type)
    if cls is None:
        raise TableError(f"unknown target type {target_type!r} (known: {', '.join(sorted(_REGISTRY))})")
    return cls.from_params(start, length, params)


def parse_table(text: str) -> list[Target]:
    return [parse_line(ln) for ln in text.splitlines() if ln.strip()]


def format_table(targets: list[Target]) -> str:
    return "\n".join(t.line() for t in targets)


# -- targets ------------------------------------------------------------------

@dataclass(frozen=True)
class Linear(Target):
    """linear <dev> <offset>"""

    device: str = ""
    offset_sectors: int = 0
    target_type: ClassVar[str] = "linear"

    def params(self) -> str:
        return f"{self.device} {self.offset_sectors}"

    @classmethod
    def from_params(cls, start, length, params):
        w = params.split()
        _need(w, 2, "linear", "<dev> <offset>")
        return cls(start, length, w[0], _int(w[1], "linear offset"))


@dataclass(frozen=True)
class Error(Target):
    """error (no parameters): every I/O fails."""

    target_type: ClassVar[str] = "error"

    def params(self) -> str:
        return ""

    @classmethod
    def from_params(cls, start, length, params):
        return cls(start, length)


@dataclass(frozen=True)
class SnapshotOrigin(Target):
    """snapshot-origin <origin>: writes copy the old chunk to every snapshot first."""

    origin: str = ""
    target_type: ClassVar[str] = "snapshot-origin"

    def params(self) -> str:
        return self.origin

    @classmethod
    def from_params(cls, start, length, params):
        w = params.split()
        _need(w, 1, "snapshot-origin", "<origin>")
        return cls(start, length, w[0])


_PERSISTENCE = ("P", "N", "PO")


@dataclass(frozen=True)
class Snapshot(Target):
    """snapshot <origin> <COW device> <P|N|PO> <chunksize in sectors>"""

    origin: str = ""
    cow: str = ""
    persistence: str = "P"
    chunk_sectors: int = 8
    target_type: ClassVar[str] = "snapshot"

    def __post_init__(self):
        if self.persistence not in _PERSISTENCE:
            raise TableError(f"{self.target_type}: persistence must be one of {_PERSISTENCE}, "
                             f"got {self.persistence!r}")
        if self.chunk_sectors <= 0 or self.chunk_sectors & (self.chunk_sectors - 1):
            raise TableError(f"{self.target_type}: chunk size must be a power of two in sectors, "
                             f"got {self.chunk_sectors}")

    def params(self) -> str:
        return f"{self.origin} {self.cow} {self.persistence} {self.chunk_sectors}"

    @classmethod
    def from_params(cls, start, length, params):
        w = params.split()
        _need(w, 4, cls.target_type, "<origin> <COW device> <P|N|PO> <chunksize>")
        return cls(start, length, w[0], w[1], w[2], _int(w[3], "chunk size"))


@dataclass(frozen=True)
class SnapshotMerge(Snapshot):
    """snapshot-merge <origin> <COW device> <P> <chunksize>: merges the store back."""

    target_type: ClassVar[str] = "snapshot-merge"

    def __post_init__(self):
        super().__post_init__()
        if self.persistence != "P":
            raise TableError("snapshot-merge: only a persistent (P) store can merge")


@dataclass(frozen=True)
class Era(Target):
    """era <metadata dev> <origin dev> <block size in sectors>"""

    metadata: str = ""
    origin: str = ""
    block_sectors: int = 128
    target_type: ClassVar[str] = "era"

    def params(self) -> str:
        return f"{self.metadata} {self.origin} {self.block_sectors}"

    @classmethod
    def from_params(cls, start, length, params):
        w = params.split()
        _need(w, 3, "era", "<metadata dev> <origin dev> <block size>")
        return cls(start, length, w[0], w[1], _int(w[2], "era block size"))


@dataclass(frozen=True)
class Mirror(Target):
    """mirror <log type> <#log args> <log args> <#devs> <dev> <offset>... [<#features> <features>]

    `log_args` are kept as words (for core: region size in sectors, then
    sync|nosync); `legs` are (device, offset in sectors).
    """

    log_type: str = "core"
    log_args: tuple[str, ...] = ("1024",)
    legs: tuple[tuple[str, int], ...] = ()
    features: tuple[str, ...] = ()
    target_type: ClassVar[str] = "mirror"

    def params(self) -> str:
        words = [self.log_type, str(len(self.log_args)), *self.log_args, str(len(self.legs))]
        for dev, off in self.legs:
            words += [dev, str(off)]
        if self.features:
            words += [str(len(self.features)), *self.features]
        return " ".join(words)

    @classmethod
    def from_params(cls, start, length, params):
        w = params.split()
        usage = "<log type> <#log args> <log args> <#devs> <dev> <offset>... [<#features> <features>]"
        _need(w, 3, "mirror", usage)
        log_type = w[0]
        nlog = _int(w[1], "mirror #log args")
        _need(w, 3 + nlog, "mirror", usage)
        log_args = tuple(w[2:2 + nlog])
        i = 2 + nlog
        ndev = _int(w[i], "mirror #devs")
        i += 1
        _need(w, i + 2 * ndev, "mirror", usage)
        legs = tuple((w[i + 2 * k], _int(w[i + 2 * k + 1], "mirror leg offset")) for k in range(ndev))
        i += 2 * ndev
        features: tuple[str, ...] = ()
        if i < len(w):
            nfeat = _int(w[i], "mirror #features")
            features = tuple(w[i + 1:i + 1 + nfeat])
            if len(features) != nfeat:
                raise TableError(f"mirror: {nfeat} features announced, {len(features)} given")
        return cls(start, length, log_type, log_args, legs, features)


@dataclass(frozen=True)
class Flakey(Target):
    """flakey <dev> <offset> <up interval s> <down interval s> [<#features> <features>] (tests)"""

    device: str = ""
    offset_sectors: int = 0
    up_seconds: int = 0
    down_seconds: int = 0
    features: tuple[str, ...] = ()
    target_type: ClassVar[str] = "flakey"

    def params(self) -> str:
        words = [self.device, str(self.offset_sectors), str(self.up_seconds), str(self.down_seconds)]
        if self.features:
            words += [str(len(self.features)), *self.features]
        return " ".join(words)

    @classmethod
    def from_params(cls, start, length, params):
        w = params.split()
        _need(w, 4, "flakey", "<dev> <offset> <up interval> <down interval>")
        features: tuple[str, ...] = ()
        if len(w) > 4:
            n = _int(w[4], "flakey #features")
            features = tuple(w[5:5 + n])
        return cls(start, length, w[0], _int(w[1], "flakey offset"), _int(w[2], "up interval"),
                   _int(w[3], "down interval"), features)


@dataclass(frozen=True)
class Delay(Target):
    """delay <dev> <offset> <ms> [<write dev> <write offset> <write ms>] (tests)"""

    device: str = ""
    offset_sectors: int = 0
    delay_ms: int = 0
    write: tuple[str, int, int] | None = None
    target_type: ClassVar[str] = "delay"

    def params(self) -> str:
        text = f"{self.device} {self.offset_sectors} {self.delay_ms}"
        if self.write is not None:
            dev, off, ms = self.write
            text += f" {dev} {off} {ms}"
        return text

    @classmethod
    def from_params(cls, start, length, params):
        w = params.split()
        _need(w, 3, "delay", "<dev> <offset> <delay ms> [<write dev> <offset> <delay ms>]")
        write = None
        if len(w) >= 6:
            write = (w[3], _int(w[4], "delay write offset"), _int(w[5], "write delay"))
        return cls(start, length, w[0], _int(w[1], "delay offset"), _int(w[2], "delay"), write)
