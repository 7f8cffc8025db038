"""Both daemons end to end, started as a user starts them (`dmrepl up NAME`), one per network
namespace inside the VM (kernel tier, e2e).

    namespace p (10.77.0.1): dmrepl up r5 --config p.toml    mirror(P, /dev/nbdN) + era, control socket
    namespace s (10.77.0.2): dmrepl up r5 --config s.toml    origin/hidden/active, nbdkit, control link

The test process itself sits in neither: it writes to /dev/mapper/dmrepl-r5 (block devices are not
per namespace) and asks the daemons through their control sockets and the CLI, as an admin would.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time

import pytest
import sweep

from dmrepl import poll
from dmrepl.daemon import control
from dmrepl.daemon.export import port_accepts
from dmrepl.kernel import blockdev
from dmrepl.lab import Lab
from dmrepl.names import StackNames

MiB = 1 << 20
DISK = 32 * MiB
NBD_PORT, LINK_PORT = 10809, 10810
NAME = "r5"
START_TIMEOUT = 240     # a Python start under TCG takes seconds; a minute and more beside another VM
TOP = StackNames(NAME).mapper_path_top()
ACTIVE = StackNames(NAME).mapper_path("active")


class Hosts:
    """Config files, key and images for both sides; the daemons they run; their logs."""

    def __init__(self, tmp_path, lab: Lab, logs: str):
        self.dir, self.lab, self.logs = tmp_path, lab, logs
        self.nbd_timeout_s = 15
        self.procs: dict[str, subprocess.Popen] = {}
        key = tmp_path / "r5.key"
        key.write_text(os.urandom(32).hex() + "\n")
        key.chmod(0o600)
        self.key = str(key)
        _image(tmp_path / "p.img", DISK, b"\x11")
        _image(tmp_path / "s.img", DISK, None)      # S starts empty: the initial sync fills it
        # Stores of half the disk: the initial sync goes in segments of half a store, with a
        # checkpoint between them that empties the store it filled.
        for name, size in (("era.img", 4 * MiB), ("h0.img", DISK // 2), ("h1.img", DISK // 2)):
            _image(tmp_path / name, size, None)
        self.s_addr = lab.hosts["s"].address
        self.write_configs()

    def write_configs(self, primary: str = "", secondary: str = "", resource_id: str = "r5-id") -> None:
        d = self.dir
        (d / "s.toml").write_text(
            f'name = "{NAME}"\nresource_id = "r5-id"\nstate_dir = "{d}/s-state"\n[secondary]\n'
            f'disk = "{d}/s.img"\nhidden_stores = ["{d}/h0.img", "{d}/h1.img"]\n'
            f'listen = "{self.s_addr}:{NBD_PORT}"\nlink_listen = "{self.s_addr}:{LINK_PORT}"\n'
            f'key_file = "{self.key}"\n{secondary}')
        (d / "p.toml").write_text(
            f'name = "{NAME}"\nresource_id = "{resource_id}"\nstate_dir = "{d}/p-state"\n[primary]\n'
            f'disk = "{d}/p.img"\nera_metadata = "{d}/era.img"\nkey_file = "{self.key}"\nera_block_kib = 64\n'
            f'checkpoint_interval_s = 0\nheartbeat_interval_s = 0.2\nheartbeat_misses = 3\nnbd_connections = 2\n'
            # A request slower than the NBD timeout reads as a dead link; under TCG beside other
            # load that can be seconds.  The cut-link test sets 2 s: it measures the bound.
            f'nbd_timeout_s = {self.nbd_timeout_s}\n'
            f'netns = "{self.lab.hosts["p"].netns}"\n'
            f'{primary}[[primary.secondaries]]\nnbd = "{self.s_addr}:{NBD_PORT}"\nlink = "{self.s_addr}:{LINK_PORT}"\n')

    def config(self, host: str) -> str:
        return str(self.dir / f"{host}.toml")

    def socket(self) -> str:
        return control.socket_path(str(self.dir / "p-state" / NAME))

    def start(self, host: str, *extra: str) -> subprocess.Popen:
        """The secondary runs inside namespace s; the primary starts in the initial namespace and
        moves its link sockets into p itself (its config's 'netns': the nbd netlink family lives
        in the initial namespace only)."""
        log = open(os.path.join(self.logs, f"{host}.log"), "ab")
        argv = [sys.executable, "-m", "dmrepl.cli", "up", NAME, "--config", self.config(host), *extra]
        popen = self.lab.popen if host == "s" else (lambda _h, a, **kw: subprocess.Popen(a, **kw))
        self.procs[host] = popen(host, argv, stdout=log, stderr=log)
        log.close()
        return self.procs[host]

    def log(self, host: str) -> str:
        with open(os.path.join(self.logs, f"{host}.log"), errors="replace") as f:
            return f.read()

    def start_secondary(self) -> None:
        self.start("s")

        def ready():
            assert self.procs["s"].poll() is None, self.log("s")
            with self.lab.inside("s"):
                return port_accepts(self.s_addr, LINK_PORT)

        poll.wait_for(ready, "the secondary's control link", timeout=START_TIMEOUT)

    def start_primary(self, *extra: str) -> None:
        self.start("p", *extra)
        poll.wait_for(self.status, "the primary to replicate", ok=lambda s: s and s["state"] == "replicating",
                      timeout=START_TIMEOUT)

    def status(self) -> dict | None:
        assert self.procs["p"].poll() is None, self.log("p")
        try:
            return control.request(self.socket(), "status", timeout=10)
        except control.DaemonNotRunning:
            return None

    def cli(self, host: str, *argv: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "dmrepl.cli", *argv, NAME, "--config", self.config(host)],
                              capture_output=True, text=True, timeout=120)

    def stop(self) -> None:
        if self.procs.get("p") and self.procs["p"].poll() is None:
            self.cli("p", "down")
        if self.procs.get("s"):
            self.cli("s", "down", "--force")
        for proc in self.procs.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=30)
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def _image(path, size: int, fill: bytes | None) -> None:
    with open(path, "wb") as f:
        if fill is None:
            f.truncate(size)
        else:
            f.write(fill * size)


LOGS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                    "build", "test-logs")


@pytest.fixture
def hosts(tmp_path, request):
    # The daemons' logs go to the project's build/test-logs/TEST/{p,s}.log: they outlive the
    # guest's /tmp and can be followed from the host while the test runs.
    logs = os.path.join(LOGS, request.node.name)
    shutil.rmtree(logs, ignore_errors=True)
    os.makedirs(logs)
    with Lab(sweep.lab_tag()) as lab:
        h = Hosts(tmp_path, lab, logs)
        try:
            yield h
        finally:
            h.stop()


def test_initial_sync_checkpoints_and_failover_end_to_end(hosts):
    hosts.start_secondary()
    hosts.start_primary()
    s = hosts.status()
    assert s["checkpoint"] == 1 and s["mirror_health"] == "AA", s
    assert "initial sync: 32 MiB copied" in hosts.log("p")
    assert blockdev.read_at(ACTIVE, 0, DISK) == b"\x11" * DISK        # checkpoint 1 = P after the sync

    blockdev.write_at(TOP, 4 * MiB, b"\x22" * (2 * MiB))             # a consumer of the primary writes
    assert blockdev.read_at(ACTIVE, 4 * MiB, MiB) == b"\x11" * MiB   # the standby view stays at checkpoint 1
    r = hosts.cli("p", "checkpoint", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["checkpoint"] == 2
    at_checkpoint = blockdev.read_at(TOP, 0, DISK)
    blockdev.write_at(TOP, 0, b"\x33" * MiB)                         # the primary goes on writing
    assert blockdev.read_at(ACTIVE, 0, DISK) == at_checkpoint
    with open(hosts.dir / "p.img", "rb") as f:
        assert f.read(MiB) == b"\x33" * MiB

    status = hosts.cli("p", "status")
    assert "primary, REPLICATING" in status.stdout and "checkpoint 2" in status.stdout, status.stdout

    r = hosts.cli("s", "failover", "--json")                         # the secondary takes over
    assert r.returncode == 0, r.stderr
    assert blockdev.read_at(ACTIVE, 0, DISK) == at_checkpoint
    blockdev.write_at(ACTIVE, 8 * MiB, b"\x44" * MiB)                 # and writes on its own
    want = bytearray(at_checkpoint)
    want[8 * MiB:9 * MiB] = b"\x44" * MiB
    assert blockdev.read_at(ACTIVE, 0, DISK) == bytes(want)
    # The fenced secondary is gone for the primary: it says so, with the reason.
    s = poll.wait_for(hosts.status, "the primary to notice", ok=lambda s: s["state"] == "disconnected")
    assert s["reason"], s
    r = hosts.cli("p", "checkpoint")
    assert r.returncode == 1 and "is disconnected" in r.stderr and "invalid state" in r.stderr, r.stderr


def test_a_cut_link_makes_the_primary_disconnected_without_hanging_writes(hosts):
    hosts.nbd_timeout_s = 2
    hosts.write_configs()
    hosts.start_secondary()
    hosts.start_primary("--assume-clean")
    assert "initial sync" not in hosts.log("p")
    hosts.lab.link_down("s")
    t0 = time.monotonic()
    done = {}

    def write():
        blockdev.write_at(TOP, MiB, b"\x55" * MiB)
        done["s"] = time.monotonic() - t0

    t = threading.Thread(target=write, daemon=True)
    t.start()
    s = poll.wait_for(hosts.status, "the primary to notice the cut",
                      ok=lambda s: s["state"] == "disconnected", timeout=15)
    noticed = time.monotonic() - t0
    t.join(timeout=30)
    assert "s" in done, "a primary write hung with the link cut"
    # Heartbeats every 0.2 s, 3 missed; the NBD timeout is 2 s: either way within a few seconds.
    assert noticed < 10, (noticed, s)
    assert any(w in s["reason"] for w in ("heartbeat", "link", "leg")), s
    assert "DISCONNECTED" in hosts.log("p")
    with open(hosts.dir / "p.img", "rb") as f:
        f.seek(MiB)
        assert f.read(MiB) == b"\x55" * MiB
    hosts.lab.link_up("s")


@pytest.mark.parametrize("change,reason", [
    (dict(resource_id="other-id"), "refused this host: resource id: this host has 'other-id', the peer 'r5-id'"),
    (dict(primary="chunk_kib = 8\n"), "refused this host: chunk size: this host expects 8 KiB, the peer 4 KiB"),
])
def test_a_peer_that_disagrees_is_refused_and_nothing_changes(hosts, change, reason):
    hosts.write_configs(**change)
    hosts.start_secondary()
    before = (hosts.dir / "s-state" / NAME / "state.json").read_text()
    proc = hosts.start("p")
    assert proc.wait(timeout=60) == 1
    log = hosts.log("p")
    assert reason in log, log
    assert not os.path.exists(TOP) and not os.path.exists(StackNames(NAME).mapper_path("mirror"))
    assert (hosts.dir / "s-state" / NAME / "state.json").read_text() == before
    assert not os.path.exists(hosts.dir / "p-state" / NAME / "state.json")


def test_a_wrong_key_is_refused(hosts):
    hosts.start_secondary()
    (hosts.dir / "p.key").write_text(os.urandom(32).hex() + "\n")
    (hosts.dir / "p.key").chmod(0o600)
    cfg = (hosts.dir / "p.toml").read_text().replace(hosts.key, str(hosts.dir / "p.key"))
    (hosts.dir / "p.toml").write_text(cfg)
    proc = hosts.start("p")
    assert proc.wait(timeout=60) == 1
    assert "control link" in hosts.log("p")
    assert not os.path.exists(TOP)
    assert "refused" in hosts.log("s")
