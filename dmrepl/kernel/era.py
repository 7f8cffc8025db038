"""dm-era change tracking: messages to the era target and era_invalidate.

Facts (checked in the test VM, docs/kernel-notes.md): the current era
advances on every suspend/resume, on the "checkpoint" message and on
"take_metadata_snap"; `era_invalidate --written-since E` lists the era blocks
written in era E or later, as XML ranges [begin, end) and single blocks.
Kernel reference: Documentation/admin-guide/device-mapper/era.rst.
"""

from __future__ import annotations

import errno
import subprocess
import xml.etree.ElementTree as ET

from dmrepl import tools
from dmrepl.kernel import blockdev
from dmrepl.kernel.dm import Control
from dmrepl.kernel.errors import KernelError
from dmrepl.kernel.status import EraStatus
from dmrepl.kernel.tables import Era
from dmrepl.ranges import merge

HEADER_BYTES = 4096   # dm-era formats metadata whose superblock is zeroes (dm-era-target.c)


def format_metadata(metadata_dev: str) -> None:
    """Make the next era table loaded over `metadata_dev` start a new history."""
    blockdev.write_at(metadata_dev, 0, bytes(HEADER_BYTES))


class EraToolError(KernelError):
    """era_invalidate (thin-provisioning-tools) failed or is missing."""


def status(ctl: Control, name: str) -> EraStatus:
    (spec,) = ctl.status(name)
    return EraStatus.parse(spec.text)


def checkpoint(ctl: Control, name: str) -> int:
    """Send "checkpoint": start a new era; returns the era now current."""
    ctl.message(name, "checkpoint")
    return status(ctl, name).current_era


def parse_blocks(xml_text: str) -> list[tuple[int, int]]:
    """era_invalidate's XML as sorted, merged [begin, end) block ranges."""
    try:
        root = ET.fromstring(xml_text)
    except ET.ParseError as e:
        raise ValueError(f"era_invalidate output is not XML: {e}") from None
    ranges = []
    for el in root:
        if el.tag == "block":
            b = int(el.attrib["block"])
            ranges.append((b, b + 1))
        elif el.tag == "range":
            ranges.append((int(el.attrib["begin"]), int(el.attrib["end"])))
        else:
            raise ValueError(f"era_invalidate output: unexpected element <{el.tag}>")
    return merge(ranges)


def _invalidate(metadata_dev: str, era: int, snapshot: bool) -> list[tuple[int, int]]:
    tool = tools.ERA_INVALIDATE.path()
    if tool is None:
        raise EraToolError(errno.ENOENT, tools.ERA_INVALIDATE.command, None,
                           f"apt-get install {tools.ERA_INVALIDATE.package}")
    proc = subprocess.run([tool, "--written-since", str(era), *(["--metadata-snapshot"] if snapshot else []),
                           metadata_dev], capture_output=True, text=True)
    if proc.returncode != 0:
        raise EraToolError(errno.EIO, tools.ERA_INVALIDATE.command, metadata_dev, proc.stderr.strip())
    return parse_blocks(proc.stdout)


def written_since(ctl: Control, name: str, metadata_dev: str, era: int) -> list[tuple[int, int]]:
    """Era blocks written in `era` or later on the live era device `name`.

    Reads a metadata snapshot (take_metadata_snap / drop_metadata_snap) so that
    the device keeps running; the snapshot is dropped whatever happens.
    """
    ctl.message(name, "take_metadata_snap")
    try:
        return _invalidate(metadata_dev, era, snapshot=True)
    finally:
        ctl.message(name, "drop_metadata_snap")


def written_since_offline(metadata_dev: str, era: int) -> list[tuple[int, int]]:
    """Era blocks written in `era` or later, from metadata no era device uses any more.  Only
    archived eras count: a removal archives the current one, a crash does not (`settle`)."""
    return _invalidate(metadata_dev, era, snapshot=False)


def settle(ctl: Control, name: str, uuid: str, metadata_dev: str, data_dev: str, block_sectors: int) -> None:
    """Archive the era a crash left current: load an era device over the metadata, resume it (its
    preresume rolls the era over) and remove it, with no I/O through it.  Without this,
    era_invalidate misses every write of the era that was current at the crash, though its
    writeset is on disk (docs/kernel-notes.md; tests/kernel/test_era.py)."""
    ctl.create(name, uuid)
    try:
        ctl.load(name, [Era(0, blockdev.size_bytes(data_dev) // 512, metadata_dev, data_dev, block_sectors)])
        ctl.resume(name)
    finally:
        ctl.remove(name)
