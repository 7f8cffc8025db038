"""Two hosts in one VM for the daemon tests: one network namespace each, configs, key, images, logs.

    namespace p (10.77.0.1): dmrepl up r5 --config p.toml    mirror(P, /dev/nbdN) + era, control socket
    namespace s (10.77.0.2): dmrepl up r5 --config s.toml    origin/hidden/active, nbdkit, control link

The test process itself sits in neither: it writes to /dev/mapper/dmrepl-r5 (block devices are not
per namespace) and asks the daemons through their control sockets and the CLI, as an admin would.
"""

from __future__ import annotations

import contextlib
import io
import os
import random
import socket
import subprocess
import sys
import threading
import time
import tomllib

from dmrepl import cli, poll
from dmrepl.daemon import control
from dmrepl.daemon.export import port_accepts
from dmrepl.kernel import blockdev
from dmrepl.lab import TUNNEL, WG_PORT, Lab  # noqa: F401 (the tunnel tests take them from here)
from dmrepl.names import StackNames

KiB, MiB = 1 << 10, 1 << 20
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
        # How the daemons and the CLI are run: this tree's code by default; the installed .deb's
        # command in test_package.py (with `cwd` and `env` such that nothing imports this tree).
        # `enter` comes before everything, `ip netns exec` included (a mount namespace: nsenter).
        self.command = [sys.executable, "-m", "dmrepl.cli"]
        self.enter: list[str] = []
        self.cwd: str | None = None
        self.env: dict | None = None
        key = tmp_path / "r5.key"
        key.write_text(os.urandom(32).hex() + "\n")
        key.chmod(0o600)
        self.key = str(key)
        image(tmp_path / "p.img", DISK, b"\x11")
        image(tmp_path / "s.img", DISK, None)      # S starts empty: the initial sync fills it
        # Stores of half the disk: the initial sync goes in segments of half a store, with a
        # checkpoint between them that empties the store it filled.
        for name, size in (("era.img", 4 * MiB), ("h0.img", DISK // 2), ("h1.img", DISK // 2)):
            image(tmp_path / name, size, None)
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

    def use_tunnel(self, wrong_key_for_p: bool = False) -> None:
        """Both configs with [link] encrypt = "wireguard" (Lab.wireguard_tables): the link on
        TUNNEL["s"], inside the tunnel; `wrong_key_for_p`: p expects another key of s."""
        tables = self.lab.wireguard_tables(str(self.dir), wrong_key_for_p)
        self.s_addr = TUNNEL["s"]
        self.write_configs()
        for h in ("p", "s"):
            with open(self.config(h), "a") as f:
                f.write(tables[h])

    def config(self, host: str) -> str:
        return str(self.dir / f"{host}.toml")

    def socket(self) -> str:
        return control.socket_path(str(self.dir / "p-state" / NAME))

    def start(self, host: str, *extra: str) -> subprocess.Popen:
        """The secondary runs inside namespace s; the primary starts in the initial namespace and
        moves its link sockets into p itself (its config's 'netns': the nbd netlink family lives
        in the initial namespace only)."""
        log = open(os.path.join(self.logs, f"{host}.log"), "ab")
        argv = [*self.command, "up", NAME, "--config", self.config(host), *extra]
        argv = [*self.enter, *(self.lab.argv(host, argv) if host == "s" else argv)]
        self.procs[host] = subprocess.Popen(argv, stdout=log, stderr=log, cwd=self.cwd, env=self.env)
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

    def down_here(self, host: str, *extra: str) -> int:
        out = io.StringIO()
        with open(self.config(host), "rb") as f:
            name = tomllib.load(f).get("name", NAME)       # r5b once both_roles() wrote s's config
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            rc = cli.main(["down", name, "--config", self.config(host), *extra])
        if rc != 0:
            print(f"teardown: dmrepl down on {host}: exit {rc}: {out.getvalue()}")
        return rc

    def cli(self, host: str, *argv: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([*self.enter, *self.command, *argv, NAME, "--config", self.config(host)],
                              capture_output=True, text=True, timeout=timeout, cwd=self.cwd, env=self.env)

    def stop(self) -> None:
        """Both daemons down at the test's end.  `dmrepl down` runs in this process (the CLI's own
        main): two Python starts less per test, 8-10 s under TCG; the tests run the CLI's down."""
        if self.procs.get("p") and self.procs["p"].poll() is None:
            self.down_here("p")
        if self.procs.get("s"):
            self.down_here("s", "--force")
        for proc in self.procs.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=30)
            if proc.poll() is None:
                proc.kill()
                proc.wait()


# -- both hosts with both roles (failover, failback): A is host p (name r5), B host s (name r5b) --------
# The two "hosts" share one kernel, so their dm names must differ; the resource id is the same.

B_NAME = "r5b"


def name_of(host: str) -> str:
    return NAME if host == "p" else B_NAME


def both_roles(hosts: Hosts) -> None:
    """Configs where each host has both sections: A's hidden stores, B's era metadata; B named r5b."""
    d, lab = hosts.dir, hosts.lab
    p_addr = lab.hosts["p"].address
    for name in ("ph0.img", "ph1.img"):
        image(d / name, DISK // 2, None)
    image(d / "s-era.img", 4 * MiB, None)
    hosts.nbd_timeout_s = 5
    hosts.write_configs(primary="reconnect_interval_s = 0.5\n")
    p = (d / "p.toml").read_text().replace(f'name = "{NAME}"\n', f'name = "{NAME}"\nstart_as = "primary"\n', 1)
    (d / "p.toml").write_text(
        p + f'[secondary]\ndisk = "{d}/p.img"\nhidden_stores = ["{d}/ph0.img", "{d}/ph1.img"]\n'
        f'listen = "{p_addr}:{NBD_PORT}"\nlink_listen = "{p_addr}:{LINK_PORT}"\nkey_file = "{hosts.key}"\n')
    s = (d / "s.toml").read_text().replace(f'name = "{NAME}"\n', f'name = "{B_NAME}"\nstart_as = "secondary"\n', 1)
    (d / "s.toml").write_text(
        s + f'[primary]\ndisk = "{d}/s.img"\nera_metadata = "{d}/s-era.img"\nkey_file = "{hosts.key}"\n'
        f'era_block_kib = 64\ncheckpoint_interval_s = 0\nheartbeat_interval_s = 0.2\nnbd_connections = 2\n'
        f'nbd_timeout_s = 5\nreconnect_interval_s = 0.5\nnetns = "{lab.hosts["s"].netns}"\n'
        f'[[primary.secondaries]]\nnbd = "{p_addr}:{NBD_PORT}"\nlink = "{p_addr}:{LINK_PORT}"\n')


def cli_of(hosts: Hosts, host: str, *argv: str) -> subprocess.CompletedProcess:
    """`dmrepl ACTION NAME --config HOST.toml ARGS` with the host's own resource name."""
    return subprocess.run([sys.executable, "-m", "dmrepl.cli", argv[0], name_of(host), "--config",
                           hosts.config(host), *argv[1:]], capture_output=True, text=True, timeout=180)


def socket_of(hosts: Hosts, host: str) -> str:
    """The control socket of the primary daemon on `host` (with its own resource name)."""
    return control.socket_path(str(hosts.dir / f"{host}-state" / name_of(host)))


def status_of(hosts: Hosts, host: str) -> dict | None:
    """The primary daemon's status on `host` (None: no daemon answers)."""
    try:
        return control.request(socket_of(hosts, host), "status", timeout=10)
    except control.DaemonNotRunning:
        return None


def up_as(hosts: Hosts, host: str, role: str, *extra: str) -> subprocess.Popen:
    """A secondary runs inside its namespace and returns once its control link listens; a primary
    starts outside and enters its namespace itself (config netns)."""
    log = open(os.path.join(hosts.logs, f"{host}-{role}.log"), "ab")
    argv = [sys.executable, "-m", "dmrepl.cli", "up", name_of(host), "--config", hosts.config(host), *extra]
    hosts.procs[host] = (hosts.lab.popen(host, argv, stdout=log, stderr=log) if role == "secondary"
                         else subprocess.Popen(argv, stdout=log, stderr=log))
    log.close()
    if role == "secondary":
        def listening():
            assert hosts.procs[host].poll() is None, hosts.log(f"{host}-secondary")
            with hosts.lab.inside(host):
                return port_accepts(hosts.lab.hosts[host].address, LINK_PORT)
        poll.wait_for(listening, f"{host}'s control link", timeout=START_TIMEOUT)
    return hosts.procs[host]


def image(path, size: int, fill: bytes | None) -> None:
    with open(path, "wb") as f:
        if fill is None:
            f.truncate(size)
        else:
            f.write(fill * size)


DEADLINE_S = 10.0       # no write may take longer, whatever the fault (TCG: generous)


class Writer:
    """4 KiB writes to the primary's device in a thread, each stamped (block, sequence) and timed."""

    def __init__(self, blocks: list[int], pause_s: float = 0.01, path: str = TOP):
        self.blocks, self.pause_s, self.path = blocks, pause_s, path
        self.last: dict[int, bytes] = {}
        self.latencies: list[tuple[float, float]] = []   # (start time, seconds)
        self.written: list[tuple[float, int]] = []       # (start time, block) of every write
        self.seq = 0
        self.started: float | None = None
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.rnd = random.Random(7)

    def _run(self) -> None:
        while not self.stop.is_set():
            blk = self.rnd.choice(self.blocks)
            self.seq += 1
            data = f"{blk}:{self.seq}:".encode().ljust(4 * KiB, b"w")
            self.started = time.monotonic()
            blockdev.write_at(self.path, blk * 4 * KiB, data)
            self.latencies.append((self.started, time.monotonic() - self.started))
            self.written.append((self.started, blk))
            self.started = None
            self.last[blk] = data
            time.sleep(self.pause_s)

    def __enter__(self) -> "Writer":
        self.thread.start()
        return self

    def check_deadline(self) -> None:
        started = self.started
        assert started is None or time.monotonic() - started < DEADLINE_S, "a write missed its deadline"

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join(timeout=DEADLINE_S)
        assert not self.thread.is_alive(), "a write hung past its deadline"

    def changed_blocks(self, since: float = 0.0) -> set[int]:
        """The distinct 4 KiB blocks this writer wrote from `since` on."""
        return {blk for start, blk in self.written if start >= since}

    def changed_bytes(self, since: float = 0.0) -> int:
        """The bytes this writer changed from `since` on (what a resync's "at most 1.05x the bytes
        changed" counts against)."""
        return len(self.changed_blocks(since)) * 4 * KiB

    def stall_after(self, t: float) -> float:
        """The longest a write that started after `t` took (or was waiting at the end)."""
        return max([s for start, s in self.latencies if start >= t - DEADLINE_S and start + s >= t] or [0.0])


class Capture:
    """Every frame on one host's veth, from an AF_PACKET socket made in its namespace (what a
    tap on the wire between the hosts would see)."""

    def __init__(self, lab: Lab, host: str):
        with lab.inside(host):
            self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))  # ETH_P_ALL
            self.sock.bind((lab.hosts[host].ifname, 0))
        self.sock.settimeout(0.2)
        self.frames: list[bytes] = []
        self.stopped = False
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stopped:
            try:
                self.frames.append(self.sock.recv(65536))
            except TimeoutError:
                continue

    def __enter__(self) -> "Capture":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stopped = True
        self.thread.join()
        # What the kernel queued before now and the thread had no time to read (a busy host):
        # the frames of a write that returned are all in the queue already.
        self.sock.setblocking(False)
        try:
            while True:
                self.frames.append(self.sock.recv(65536))
        except BlockingIOError:
            pass
        finally:
            self.sock.close()

    def shows(self, pattern: bytes, piece: int = 512) -> int:
        """How many of `pattern`'s `piece`-byte pieces some frame carries in clear (a TCP segment
        of the plain link holds whole pieces of every write it carries)."""
        return sum(any(pattern[i:i + piece] in f for f in self.frames) for i in range(0, len(pattern), piece))
