"""`dmrepl demo`: a primary and a secondary on one machine, every byte checked.

Two network namespaces joined by veth play the two hosts (dmrepl.lab); each
runs its daemon exactly as `dmrepl up NAME` runs it under systemd, with its
own config file, on loop-backed image files in a work directory.  The demo is
the admin between them: it writes a known pattern to the primary's device,
asks for checkpoints through the primary's control socket, fails over on the
secondary with the CLI, and compares every byte of the secondary's view with
what the primary held at the checkpoint.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time

from dmrepl import inventory, poll, tools
from dmrepl.daemon import control
from dmrepl.errors import DmreplError
from dmrepl.kernel import blockdev
from dmrepl.lab import TUNNEL, Lab
from dmrepl.link import auth
from dmrepl.names import StackNames

MiB = 1 << 20
DISK = 64 * MiB
# Holds what the demo writes between two checkpoints (32 MiB) below the fill level at which the
# secondary asks for an early checkpoint (75 %): the demo's checkpoints are the ones it takes.
STORE = 48 * MiB
NAME = "demo"
NBD_PORT, LINK_PORT = 10809, 10810
START_TIMEOUT = 120.0


class DemoFailure(DmreplError):
    pass


def _step(n: int, text: str) -> None:
    print(f"[{n:2}] {text}", flush=True)


def check_bytes(path: str, expected: list[tuple[int, int, int]], what: str) -> None:
    """Compare every byte of `path` with (offset, length, byte value) ranges."""
    for off, length, value in expected:
        for pos in range(off, off + length, 4 * MiB):
            n = min(4 * MiB, off + length - pos)
            got = blockdev.read_at(path, pos, n)
            if got != bytes([value]) * n:
                bad = next(i for i in range(n) if got[i] != value)
                raise DemoFailure(f"{what}: byte {pos + bad} of {path} is {got[bad]:#04x}, expected {value:#04x}")
    desc = ", ".join(f"{v:#04x} in [{o // MiB}M,{(o + ln) // MiB}M)" for o, ln, v in expected)
    print(f"     ok: {what}: {desc}", flush=True)


def _write(path: str, off: int, length: int, value: int) -> float:
    t0 = time.perf_counter()
    blockdev.write_at(path, off, bytes([value]) * length)
    return length / (time.perf_counter() - t0) / 1e6


def _image(path: str, size: int, value: int | None) -> None:
    with open(path, "wb") as f:
        if value is None:
            f.truncate(size)
        else:
            for _ in range(size // MiB):
                f.write(bytes([value]) * MiB)


class Pair:
    """The work directory, the two configs and the two daemons."""

    def __init__(self, work: str, lab: Lab, wireguard: bool = False):
        """`wireguard`: the link inside a WireGuard tunnel ([link] encrypt, Lab.wireguard_tables)."""
        self.work, self.lab = work, lab
        self.procs: dict[str, subprocess.Popen] = {}
        tables = lab.wireguard_tables(work) if wireguard else {"p": "", "s": ""}
        s = TUNNEL["s"] if wireguard else lab.hosts["s"].address
        key = os.path.join(work, "demo.key")
        auth.write_new_key(key)
        state = os.path.join(work, "{}-state")
        with open(self.config("s"), "w") as f:
            f.write(f'name = "{NAME}"\nresource_id = "demo-resource"\nstate_dir = "{state.format("s")}"\n'
                    f'[secondary]\ndisk = "{work}/s.img"\nhidden_stores = ["{work}/h0.img", "{work}/h1.img"]\n'
                    f'listen = "{s}:{NBD_PORT}"\nlink_listen = "{s}:{LINK_PORT}"\nkey_file = "{key}"\n'
                    + tables["s"])
        with open(self.config("p"), "w") as f:
            f.write(f'name = "{NAME}"\nresource_id = "demo-resource"\nstate_dir = "{state.format("p")}"\n'
                    f'[primary]\ndisk = "{work}/p.img"\nera_metadata = "{work}/era.img"\nkey_file = "{key}"\n'
                    # Under QEMU TCG (scripts/demo) a request can take seconds: a short NBD timeout
                    # would read as a dead link.
                    f'checkpoint_interval_s = 0\nnbd_timeout_s = 15\nheartbeat_misses = 10\n'
                    f'netns = "{lab.hosts["p"].netns}"\n'
                    f'[[primary.secondaries]]\nnbd = "{s}:{NBD_PORT}"\nlink = "{s}:{LINK_PORT}"\n'
                    + tables["p"])
        for host in ("s", "p"):
            os.chmod(self.config(host), 0o600)      # dmrepl refuses configs others can change
        self.socket = control.socket_path(os.path.join(state.format("p"), NAME))

    def config(self, host: str) -> str:
        return os.path.join(self.work, f"{host}.toml")

    def log(self, host: str) -> str:
        return os.path.join(self.work, f"{host}.log")

    def dmrepl(self, host: str, *argv: str) -> list[str]:
        return [sys.executable, "-m", "dmrepl.cli", *argv, NAME, "--config", self.config(host)]

    def start(self, host: str, *extra: str) -> None:
        with open(self.log(host), "ab") as log:
            argv = self.dmrepl(host, "up", *extra)
            # The secondary runs inside its namespace; the primary moves its link sockets there itself
            # (its config's netns: the kernel's nbd netlink family lives in the initial namespace only).
            self.procs[host] = subprocess.Popen(self.lab.argv(host, argv) if host == "s" else argv,
                                                stdout=log, stderr=log, stdin=subprocess.DEVNULL)

    def alive(self, host: str) -> None:
        proc = self.procs[host]
        if proc.poll() is not None:
            with open(self.log(host), errors="replace") as f:
                tail = "".join(f.readlines()[-8:])
            raise DemoFailure(f"the {'primary' if host == 'p' else 'secondary'}'s daemon exited "
                              f"({proc.returncode}); its log ends:\n{tail}")

    def status(self) -> dict | None:
        self.alive("p")
        try:
            return control.request(self.socket, "status", timeout=30)
        except control.DaemonNotRunning:
            return None

    def secondary_ready(self) -> bool:
        self.alive("s")
        return any("control link listening" in line for line in open(self.log("s"), errors="replace"))

    def stop(self) -> str:
        """Both hosts down; returns what a failed `dmrepl down` said."""
        said = []

        def down(host: str, *extra: str) -> None:
            r = subprocess.run(self.dmrepl(host, "down", *extra), capture_output=True, text=True, timeout=120)
            if r.returncode != 0:
                said.append(f"{host}: {r.stderr.strip()}")

        for host in ("p", "s"):
            if host in self.procs and self.procs[host].poll() is None:
                down(host, *(["--force"] if host == "s" else []))
        for proc in self.procs.values():
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if "s" in self.procs:   # after a failover the secondary's daemon is fenced: its stack stays
            down("s", "--force")
        return "; ".join(said)


def run(keep: bool = False) -> int:
    if not inventory.available():
        raise DmreplError("device-mapper is not available on this host", "run the demo through the test VM: scripts/demo")
    if tools.NBDKIT.path() is None:
        raise DmreplError(f"nbdkit is missing (apt-get install {tools.NBDKIT.package})")
    work = tempfile.mkdtemp(prefix="dmrepl-demo-")
    top, active = StackNames(NAME).mapper_path_top(), StackNames(NAME).mapper_path("active")
    t_start = time.perf_counter()
    try:
        with Lab("demo") as lab:
            pair = Pair(work, lab)
            try:
                return _run(pair, top, active, t_start)
            except BaseException:
                print(f"demo FAILED; the daemons' logs: {pair.log('p')}, {pair.log('s')}"
                      + ("" if keep else " (removed: run with --keep to read them)"), file=sys.stderr)
                raise
            finally:
                pair.stop()
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)


def _run(pair: Pair, top: str, active: str, t_start: float) -> int:
    lab, work = pair.lab, pair.work
    _step(1, f"two hosts: namespaces {lab.hosts['p'].netns} ({lab.hosts['p'].address}) and "
          f"{lab.hosts['s'].netns} ({lab.hosts['s'].address}) joined by veth; files in {work}")
    _image(f"{work}/p.img", DISK, 0x11)
    _image(f"{work}/s.img", DISK, None)
    _image(f"{work}/era.img", 4 * MiB, None)
    for h in ("h0", "h1"):
        _image(f"{work}/{h}.img", STORE, None)
    print(f"     primary disk P: {DISK // MiB} MiB of 0x11; secondary disk S: zeroes, hidden stores "
          f"{STORE // MiB} MiB each; one shared key (0600)")

    _step(2, "secondary: dmrepl up demo  (origin, hidden, active; NBD export and control link)")
    t0 = time.perf_counter()
    pair.start("s")
    poll.wait_for(pair.secondary_ready, "the secondary's daemon", timeout=START_TIMEOUT)
    print(f"     up in {time.perf_counter() - t0:.1f} s")

    _step(3, "primary: dmrepl up demo  (hello, NBD over netlink, initial sync, mirror + era, checkpoint 1)")
    t0 = time.perf_counter()
    pair.start("p")
    s = poll.wait_for(pair.status, "the primary to replicate", ok=lambda s: bool(s) and s["state"] == "replicating",
                      timeout=START_TIMEOUT)
    with open(pair.log("p"), errors="replace") as f:
        sync = [line.split(" ", 2)[2].strip() for line in f if "copied in" in line]
    print(f"     replicating in {time.perf_counter() - t0:.1f} s: {sync[0] if sync else ''}")
    print(f"     {s['device']} -> mirror(P, {s['nbd']}) legs {s['mirror_health']}, checkpoint {s['checkpoint']}")
    check_bytes(active, [(0, DISK, 0x11)], "the secondary's view at checkpoint 1 is P")

    _step(4, "the primary's consumer writes 0x22 to [16M,48M)")
    rate = _write(top, 16 * MiB, 32 * MiB, 0x22)
    print(f"     {rate:.1f} MB/s, each write on P and S before it returns")
    if pair.status()["checkpoint"] != 1:
        raise DemoFailure("a checkpoint the demo did not ask for was taken (the secondary's store filled?)")
    check_bytes(active, [(0, DISK, 0x11)], "the secondary's view stays at checkpoint 1")

    _step(5, "dmrepl checkpoint demo")
    cp = control.request(pair.socket, "checkpoint")
    print(f"     checkpoint {cp['checkpoint']} on both hosts: the primary paused {cp['pause_ms']:.1f} ms "
          f"(the secondary's switch {cp['secondary_pause_ms']:.1f} ms)")
    at_2 = [(0, 16 * MiB, 0x11), (16 * MiB, 32 * MiB, 0x22), (48 * MiB, 16 * MiB, 0x11)]
    check_bytes(active, at_2, "the secondary's view is P at checkpoint 2")

    _step(6, "after the checkpoint the primary writes 0x33 to [0,8M); the secondary's consumer writes 0x44 to [56M,64M)")
    _write(top, 0, 8 * MiB, 0x33)
    _write(active, 56 * MiB, 8 * MiB, 0x44)
    view = at_2[:-1] + [(48 * MiB, 8 * MiB, 0x11), (56 * MiB, 8 * MiB, 0x44)]
    check_bytes(active, view, "the secondary's view: checkpoint 2 plus its own writes")

    _step(7, "the primary is lost; on the secondary: dmrepl failover demo")
    t0 = time.perf_counter()
    r = subprocess.run(pair.dmrepl("s", "failover", "--json"), capture_output=True, text=True, timeout=300)
    if r.returncode != 0:
        raise DemoFailure(f"failover failed: {r.stderr.strip()}")
    print(f"     failed over and merged in {time.perf_counter() - t0:.1f} s")
    check_bytes(active, view, "the new primary's device: checkpoint 2 plus its own writes, every byte")
    s = poll.wait_for(pair.status, "the old primary to notice", ok=lambda s: s["state"] == "degraded")
    print(f"     the old primary says: {s['state']} ({s['reason']})")

    _step(8, "dmrepl down demo on both hosts")
    said = pair.stop()

    def left() -> list[str]:
        return [n for n in os.listdir("/dev/mapper") if n.startswith(f"dmrepl-{NAME}")]

    # A device still open for a moment (udev's blkid on the active view) goes by deferred removal:
    # waited for, bounded, never asserted at once (docs/kernel-notes.md).
    if not poll.until(lambda: not left(), timeout=30):
        raise DemoFailure(f"left behind: {left()}; `dmrepl down` said: {said or 'nothing'}")
    print("     no dm device, loop device or process left")
    print(f"demo passed in {time.perf_counter() - t_start:.1f} s: every byte checked")
    return 0
