"""What the two daemons tell each other first, and whether they may replicate.

The primary sends its Hello, the secondary answers with its own; each side
checks the pair with `agree` before anything moves.  A refusal says exactly
what differs, so that the admin fixes one config, not both.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class Hello:
    resource_id: str
    role: str                 # "primary" or "secondary"
    size_bytes: int           # the disk (P or S)
    chunk_sectors: int        # the secondary's copy-before-write chunk (the primary sends what it expects)
    era_block_sectors: int    # the primary's change-tracking block (the secondary echoes it)
    checkpoints: list[int] = field(default_factory=list)  # checkpoint numbers this host holds, oldest first
    store_bytes: int = 0      # the secondary's smaller hidden store (0: not said): bounds a sync segment
    heartbeat_timeout_s: float = 0.0  # the primary's: silence longer than this means it is lost (0: never)
    # The secondary's writes of its own since its checkpoint (it was primary, or took over, and ran
    # `resolve --discard-my-data`): byte ranges [offset, length] the resync compares too.  None: none.
    diverged: list[list[int]] | None = None
    # The secondary's HELLO_OK only (never a refusal): the export name of this session, the one
    # name its NBD gate serves to the primary's address.  None: an export without a gate.
    export_name: str | None = None

    def to_wire(self) -> dict:
        return asdict(self)

    @classmethod
    def from_wire(cls, body: dict) -> "Hello":
        try:
            return cls(resource_id=str(body["resource_id"]), role=str(body["role"]),
                       size_bytes=int(body["size_bytes"]), chunk_sectors=int(body["chunk_sectors"]),
                       era_block_sectors=int(body["era_block_sectors"]),
                       checkpoints=[int(n) for n in body.get("checkpoints", [])],
                       store_bytes=int(body.get("store_bytes", 0)),
                       heartbeat_timeout_s=float(body.get("heartbeat_timeout_s", 0)),
                       diverged=_ranges(body.get("diverged")),
                       export_name=_export_name(body.get("export_name")))
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"hello without a valid {e}") from None


def _last(h: Hello) -> str:
    return str(max(h.checkpoints)) if h.checkpoints else "none"


def _export_name(raw) -> str | None:
    if raw is not None and not (isinstance(raw, str) and 0 < len(raw) <= 256 and raw.isprintable()):
        raise ValueError("export name: a printable string of 1 to 256 characters")
    return raw


def _ranges(raw) -> list[list[int]] | None:
    if raw is None:
        return None
    out = [[int(off), int(n)] for off, n in raw]
    if any(off < 0 or n <= 0 for off, n in out):
        raise ValueError("diverged ranges must be [offset >= 0, length > 0]")
    return out


@dataclass(frozen=True)
class Agreement:
    ok: bool
    reasons: list[str]
    common_checkpoint: int | None   # the newest checkpoint both hold: where a delta resync starts


def agree(mine: Hello, theirs: Hello) -> Agreement:
    reasons = []
    if mine.resource_id != theirs.resource_id:
        reasons.append(f"resource id: this host has {mine.resource_id!r}, the peer {theirs.resource_id!r}")
    if mine.role == theirs.role == "primary":
        reasons.append(f"SPLIT BRAIN: both hosts are primary (this host at checkpoint {_last(mine)}, the peer at "
                       f"{_last(theirs)}): each may hold writes the other lacks, and neither is overwritten "
                       "on its own; on the host whose writes are to be given up: `dmrepl down NAME`, "
                       "`dmrepl resolve NAME --discard-my-data`, `dmrepl up NAME`")
    elif {mine.role, theirs.role} != {"primary", "secondary"}:
        reasons.append(f"roles: this host is {mine.role}, the peer is {theirs.role}: one of each is needed")
    if mine.size_bytes != theirs.size_bytes:
        reasons.append(f"disk size: this host's is {mine.size_bytes} bytes, the peer's {theirs.size_bytes}")
    if mine.chunk_sectors != theirs.chunk_sectors:
        reasons.append(f"chunk size: this host expects {mine.chunk_sectors * 512 // 1024} KiB, "
                       f"the peer {theirs.chunk_sectors * 512 // 1024} KiB")
    if mine.era_block_sectors != theirs.era_block_sectors:
        reasons.append(f"era block size: this host uses {mine.era_block_sectors * 512 // 1024} KiB, "
                       f"the peer {theirs.era_block_sectors * 512 // 1024} KiB")
    common = sorted(set(mine.checkpoints) & set(theirs.checkpoints))
    return Agreement(ok=not reasons, reasons=reasons, common_checkpoint=common[-1] if common else None)
