"""Online grow: the VM experiment of docs/grow-research.md (E2-E4), with the project's kernel layer.

Run: scripts/vm -- python docs/experiments/grow.py   (prints lines "E: ..."; docs/kernel-notes.md)"""
import os
import sys
import tempfile
sys.path.insert(0, os.getcwd())
from dmrepl.kernel import blockdev, dm, era, loop
from dmrepl.kernel.status import SnapshotStatus
from dmrepl.kernel.tables import Era, Linear, Snapshot, SnapshotOrigin

MiB = 1 << 20
S = 512
wd = tempfile.mkdtemp(prefix="grow-")
def img(name, size, fill=None):
    p = os.path.join(wd, name)
    with open(p, "wb") as f:
        f.truncate(size)
    return p
def grow_file(p, size):
    with open(p, "r+b") as f:
        f.truncate(size)
def say(*a): print("E:", *a, flush=True)

ctl = dm.Control()
made, loops = [], []
def mk(name, table):
    ctl.create(name, "DMREPL-exp-" + name); made.append(name); ctl.load(name, table); return ctl.resume(name)
try:
    # E2: loop capacity while held by dm
    disk = img("s.img", 16 * MiB); d = loop.attach(disk); loops.append(d)
    blockdev.write_at(d, 0, b"A" * 4096)
    mk("exp-lin", [Linear(0, 16 * MiB // S, d, 0)])
    grow_file(disk, 24 * MiB)
    say("E2 before set_capacity", blockdev.size_bytes(d))
    loop.set_capacity(d)
    say("E2 after set_capacity (held by dm linear)", blockdev.size_bytes(d), "dm", blockdev.size_bytes("/dev/mapper/exp-lin"))
    ctl.remove("exp-lin"); made.remove("exp-lin")

    # E3: origin + snapshot with exceptions, then grow hidden then origin
    grow_file(disk, 16 * MiB); loop.set_capacity(d)
    say("E3 shrunk loop back to", blockdev.size_bytes(d))
    cow = img("h0.img", 8 * MiB); c = loop.attach(cow); loops.append(c)
    blockdev.write_at(c, 0, bytes(4096))
    mk("exp-origin", [SnapshotOrigin(0, 16 * MiB // S, d)])
    mk("exp-hidden", [Snapshot(0, 16 * MiB // S, d, c, "P", 8)])
    o = "/dev/mapper/exp-origin"; h = "/dev/mapper/exp-hidden"
    blockdev.write_at(o, 0, b"B" * 4096)     # COW: hidden keeps A
    blockdev.write_at(o, 8 * MiB, b"C" * 8192)
    st0 = SnapshotStatus.parse(ctl.status("exp-hidden")[0].text)
    say("E3 hidden before", st0, blockdev.read_at(h, 0, 1))
    grow_file(disk, 24 * MiB); loop.set_capacity(d)
    # hidden first (same COW): handover of exceptions
    ctl.load("exp-hidden", [Snapshot(0, 24 * MiB // S, d, c, "P", 8)])
    ctl.suspend("exp-hidden"); ctl.resume("exp-hidden")
    st1 = SnapshotStatus.parse(ctl.status("exp-hidden")[0].text)
    say("E3 hidden after reload longer", st1, "size", blockdev.size_bytes(h), blockdev.read_at(h, 0, 1), blockdev.read_at(h, 8 * MiB, 1))
    ctl.suspend("exp-origin")
    ctl.load("exp-origin", [SnapshotOrigin(0, 24 * MiB // S, d)])
    ctl.resume("exp-origin")
    say("E3 origin size", blockdev.size_bytes(o))
    blockdev.write_at(o, 20 * MiB, b"D" * 4096)     # new range: COW into hidden?
    st2 = SnapshotStatus.parse(ctl.status("exp-hidden")[0].text)
    say("E3 after a write to the new range: hidden", st2, "hidden reads", blockdev.read_at(h, 20 * MiB, 1), "origin", blockdev.read_at(o, 20 * MiB, 1))
    for n in ("exp-hidden", "exp-origin"):
        ctl.remove(n); made.remove(n)

    # E3b: origin grown before hidden: does a write to the new range COW?
    grow_file(disk, 16 * MiB); loop.set_capacity(d)
    blockdev.write_at(c, 0, bytes(4096))
    mk("exp-origin", [SnapshotOrigin(0, 16 * MiB // S, d)])
    mk("exp-hidden", [Snapshot(0, 16 * MiB // S, d, c, "P", 8)])
    grow_file(disk, 24 * MiB); loop.set_capacity(d)
    ctl.suspend("exp-origin"); ctl.load("exp-origin", [SnapshotOrigin(0, 24 * MiB // S, d)]); ctl.resume("exp-origin")
    blockdev.write_at(o, 20 * MiB, b"E" * 4096)
    stb = SnapshotStatus.parse(ctl.status("exp-hidden")[0].text)
    say("E3b origin grown first, hidden still short; write to new range: hidden", stb)
    for n in ("exp-hidden", "exp-origin"):
        ctl.remove(n); made.remove(n)

    # E4: era over linear, suspend -> load longer -> resume
    meta = img("era.img", 4 * MiB); m = loop.attach(meta); loops.append(m)
    era.format_metadata(m)
    grow_file(disk, 16 * MiB); loop.set_capacity(d)
    mk("exp-lin", [Linear(0, 16 * MiB // S, d, 0)])
    lin = ctl.info("exp-lin").devno
    mk("exp-era", [Era(0, 16 * MiB // S, m, lin, 128)])   # 64 KiB era blocks
    e = "/dev/mapper/exp-era"
    blockdev.write_at(e, 0, b"x" * 4096)
    e1 = era.checkpoint(ctl, "exp-era")
    blockdev.write_at(e, 1 * MiB, b"y" * 4096)
    say("E4 status", era.status(ctl, "exp-era"), "written since", e1, era.written_since(ctl, "exp-era", m, e1))
    grow_file(disk, 24 * MiB); loop.set_capacity(d)
    ctl.suspend("exp-era")
    ctl.suspend("exp-lin"); ctl.load("exp-lin", [Linear(0, 24 * MiB // S, d, 0)]); ctl.resume("exp-lin")
    ctl.load("exp-era", [Era(0, 24 * MiB // S, m, lin, 128)])
    ctl.resume("exp-era")
    say("E4 era size after", blockdev.size_bytes(e), era.status(ctl, "exp-era"))
    say("E4 written since", e1, "after grow", era.written_since(ctl, "exp-era", m, e1))
    blockdev.write_at(e, 2 * MiB, b"z" * 4096)
    blockdev.write_at(e, 20 * MiB, b"n" * 4096)
    say("E4 written since", e1, "after writes at 2 MiB and 20 MiB", era.written_since(ctl, "exp-era", m, e1))
    say("E4 written since 1", era.written_since(ctl, "exp-era", m, 1))
    # E4b: a too-small data device: era table longer than linear
    ctl.suspend("exp-era")
    try:
        ctl.load("exp-era", [Era(0, 32 * MiB // S, m, lin, 128)])
        try:
            ctl.resume("exp-era")
            say("E4b resume of an era longer than its data device: OK?!")
        except Exception as ex:
            say("E4b resume of an era longer than its data device:", type(ex).__name__, ex, "suspended:", ctl.info("exp-era").suspended)
            ctl.clear("exp-era") if hasattr(ctl, "clear") else None
            ctl.resume("exp-era")
            say("E4b plain resume after:", "suspended:", ctl.info("exp-era").suspended, "size", blockdev.size_bytes(e))
    except Exception as ex:
        say("E4b load failed:", type(ex).__name__, ex)
        ctl.resume("exp-era")
finally:
    for n in reversed(made):
        try: ctl.remove(n)
        except Exception as ex: say("cleanup", n, ex)
    for l in loops:
        loop.detach(l)
