"""Device-mapper status lines (DM_TABLE_STATUS) as typed values.

Kernel references: drivers/md/dm-snap.c (snapshot_status), drivers/md/dm-era-target.c
(era_status), drivers/md/dm-raid1.c (mirror_status).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from dmrepl.kernel.tables import TableError, _int


@dataclass(frozen=True)
class SnapshotStatus:
    """Status of snapshot and snapshot-merge (dm-snap.c: snapshot_status).

    `<allocated>/<total> <metadata>` in sectors while valid; otherwise one of
    "Invalid", "Overflow", "Merge failed", "Unknown".
    """

    state: str  # "valid", "invalid", "overflow", "merge_failed", "unknown"
    allocated_sectors: int = 0
    total_sectors: int = 0
    metadata_sectors: int = 0

    @classmethod
    def parse(cls, text: str) -> "SnapshotStatus":
        text = text.strip()
        special = {"Invalid": "invalid", "Overflow": "overflow",
                   "Merge failed": "merge_failed", "Unknown": "unknown"}
        if text in special:
            return cls(special[text])
        w = text.split()
        if len(w) != 2 or "/" not in w[0]:
            raise TableError(f"snapshot status: expected '<allocated>/<total> <metadata>', got {text!r}")
        alloc, total = w[0].split("/", 1)
        return cls("valid", _int(alloc, "allocated sectors"), _int(total, "total sectors"),
                   _int(w[1], "metadata sectors"))

    def format(self) -> str:
        names = {"invalid": "Invalid", "overflow": "Overflow", "merge_failed": "Merge failed",
                 "unknown": "Unknown"}
        if self.state in names:
            return names[self.state]
        return f"{self.allocated_sectors}/{self.total_sectors} {self.metadata_sectors}"

    @property
    def valid(self) -> bool:
        return self.state == "valid"

    @property
    def data_sectors(self) -> int:
        """Sectors of copied chunks (excluding the store's own metadata)."""
        return max(0, self.allocated_sectors - self.metadata_sectors)

    @property
    def fill_fraction(self) -> float:
        if not self.total_sectors:
            return 1.0 if not self.valid else 0.0
        return self.allocated_sectors / self.total_sectors

    @property
    def merge_done(self) -> bool:
        """For snapshot-merge: every exception merged back (snapshot.rst)."""
        return self.valid and self.allocated_sectors == self.metadata_sectors


@dataclass(frozen=True)
class EraStatus:
    """era status: `<metadata block size> <used>/<total> <current era> <held root|->` (era.rst)."""

    metadata_block_sectors: int
    used_metadata_blocks: int
    total_metadata_blocks: int
    current_era: int
    held_root: int | None

    @classmethod
    def parse(cls, text: str) -> "EraStatus":
        w = text.split()
        if len(w) != 4 or "/" not in w[1]:
            raise TableError(f"era status: expected '<block size> <used>/<total> <era> <root|->', got {text!r}")
        used, total = w[1].split("/", 1)
        held = None if w[3] == "-" else _int(w[3], "held metadata root")
        return cls(_int(w[0], "metadata block size"), _int(used, "used metadata blocks"),
                   _int(total, "total metadata blocks"), _int(w[2], "current era"), held)

    def format(self) -> str:
        held = "-" if self.held_root is None else str(self.held_root)
        return (f"{self.metadata_block_sectors} {self.used_metadata_blocks}/{self.total_metadata_blocks} "
                f"{self.current_era} {held}")


@dataclass(frozen=True)
class MirrorStatus:
    """mirror status (dm-raid1.c: mirror_status, STATUSTYPE_INFO):

    `<#devs> <dev>... <in sync>/<regions> 1 <health chars> <#log args> <log args>`
    with one health char per leg: A alive, D write failure, S sync failure,
    R read failure, F flush failure, U unclassified.
    """

    devices: tuple[str, ...]
    in_sync_regions: int
    total_regions: int
    health: str
    log_args: tuple[str, ...] = field(default=())

    @classmethod
    def parse(cls, text: str) -> "MirrorStatus":
        w = text.split()
        try:
            n = _int(w[0], "mirror #devs")
            devices = tuple(w[1:1 + n])
            sync, total = w[1 + n].split("/", 1)
            nstat = _int(w[2 + n], "mirror #status args")
            health = w[3 + n] if nstat else ""
            i = 3 + n + nstat
            nlog = _int(w[i], "mirror #log args")
            log_args = tuple(w[i + 1:i + 1 + nlog])
        except (IndexError, ValueError) as e:
            raise TableError(f"mirror status {text!r}: {e}") from None
        if len(devices) != n or len(health) != n:
            raise TableError(f"mirror status {text!r}: {n} legs announced")
        return cls(devices, _int(sync, "in-sync regions"), _int(total, "total regions"), health, log_args)

    def format(self) -> str:
        return " ".join([str(len(self.devices)), *self.devices,
                         f"{self.in_sync_regions}/{self.total_regions}", "1", self.health,
                         str(len(self.log_args)), *self.log_args])

    @property
    def in_sync(self) -> bool:
        return self.in_sync_regions == self.total_regions

    def leg_failed(self, index: int) -> bool:
        return self.health[index] != "A"
