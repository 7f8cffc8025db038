"""`dmrepl secondary ...` with its daemon and NBD export, and the udev rules (kernel tier)."""

import json
import os
import shutil
import signal
import socket
import subprocess

import pytest

from dmrepl import cli, poll
from dmrepl.config import load_secondary
from dmrepl.daemon import supervisor as daemon
from dmrepl.kernel import blockdev, dm, loop
from dmrepl.nbd.client import NBDClient
from dmrepl.nbd.protocol import NBDOptionError

MiB = 1 << 20
DISK = 64 * MiB
PROJECT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RULES_SRC = os.path.join(PROJECT, "udev", "56-dmrepl.rules")
RULES_RUN = "/run/udev/rules.d/56-dmrepl.rules"



@pytest.fixture
def resource(tmp_path, free_port):
    """A config file for resource r1 on image files; everything is torn down afterwards."""
    disk = tmp_path / "disk.img"
    with open(disk, "wb") as f:
        f.write(b"\x11" * DISK)
    for i in (0, 1):
        with open(tmp_path / f"h{i}.img", "wb") as f:
            f.truncate(80 * MiB)
    port = free_port()
    path = tmp_path / "r1.toml"
    path.write_text(f'name = "r1"\nresource_id = "r1-id"\nstate_dir = "{tmp_path}/state"\n'
                    f'[secondary]\ndisk = "{disk}"\nhidden_stores = ["{tmp_path}/h0.img", "{tmp_path}/h1.img"]\n'
                    f'listen = "127.0.0.1:{port}"\n')
    cfg = load_secondary(path=str(path))
    try:
        yield cfg, str(path)
    finally:
        daemon.stop(cfg)
        cli.main(["secondary", "down", "r1", "--config", str(path), "--force"])


def run(capsys, *argv):
    rc = cli.main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


def up(capsys, path):
    rc, out, err = run(capsys, "secondary", "up", "r1", "--config", path)
    assert rc == 0, err
    return out


def test_up_export_checkpoint_failover_down(resource, capsys):
    cfg, path = resource
    rc, out, err = run(capsys, "secondary", "up", "r1", "--config", path, "--json")
    assert rc == 0, err
    up = json.loads(out)
    assert up["role"] == "secondary" and up["daemon_pid"] == daemon.running_pid(cfg)

    # The primary's writes arrive through the export, flush included.
    with NBDClient.connect(cfg.listen_host, cfg.listen_port, "r1-id") as primary:
        assert primary.info.size_bytes == DISK and primary.info.can_flush and primary.info.can_fua
        primary.write(32 * MiB, b"\x22" * MiB, fua=True)
        primary.write(40 * MiB, b"\x22" * MiB)
        primary.flush()
        assert primary.read(32 * MiB, 4096) == b"\x22" * 4096
    S = loop.find(cfg.disk)[0]
    assert blockdev.read_at(S, 32 * MiB, MiB) == b"\x22" * MiB
    assert blockdev.read_at(S, 40 * MiB, MiB) == b"\x22" * MiB
    assert blockdev.read_at("/dev/mapper/dmrepl-r1-active", 32 * MiB, MiB) == b"\x11" * MiB

    rc, out, _ = run(capsys, "secondary", "status", "r1", "--config", path, "--json")
    st = json.loads(out)
    assert rc == 0 and st["up"] and st["role"] == "secondary" and st["checkpoint"] == 0
    assert st["store"]["state"] == "valid" and st["store"]["allocated_bytes"] >= 2 * MiB
    assert st["daemon_pid"] == up["daemon_pid"] and st["warnings"] == []

    rc, out, _ = run(capsys, "secondary", "checkpoint", "r1", "--config", path, "--json")
    cp = json.loads(out)
    assert rc == 0 and cp["checkpoint"] == 1 and cp["store"] == 1 and cp["pause_ms"] > 0
    assert blockdev.read_at("/dev/mapper/dmrepl-r1-active", 32 * MiB, MiB) == b"\x22" * MiB

    nbdkit = daemon.export_pid(cfg)
    rc, out, _ = run(capsys, "secondary", "failover", "r1", "--config", path, "--json")
    fo = json.loads(out)
    assert rc == 0 and fo["role"] == "primary"
    assert daemon.running_pid(cfg) is None and daemon.export_pid(cfg) is None
    assert not os.path.exists(f"/proc/{nbdkit}/cmdline") or b"nbdkit" not in open(f"/proc/{nbdkit}/cmdline", "rb").read()
    with pytest.raises(OSError):
        NBDClient.connect(cfg.listen_host, cfg.listen_port, "r1-id", timeout=2)
    rc, _, err = run(capsys, "secondary", "checkpoint", "r1", "--config", path)
    assert rc == 1 and "checkpoints are taken only on a secondary" in err

    rc, out, _ = run(capsys, "secondary", "down", "r1", "--config", path)
    assert rc == 0
    with dm.Control() as ctl:
        assert ctl.list_devices() == []
    assert loop.list_attached() == {}


def test_export_refuses_another_resource_and_survives_garbage(resource, capsys):
    cfg, path = resource
    up(capsys, path)
    with pytest.raises(NBDOptionError) as e:
        NBDClient.connect(cfg.listen_host, cfg.listen_port, "other-resource")
    assert "NBD_REP_ERR_UNKNOWN" in str(e.value)
    # Garbage on the socket: the server drops that connection, nothing else.
    with socket.create_connection((cfg.listen_host, cfg.listen_port), timeout=5) as s:
        s.recv(18)
        s.sendall(os.urandom(4096))
        s.settimeout(5)
        try:
            while s.recv(4096):
                pass
        except OSError:
            pass
    with NBDClient.connect(cfg.listen_host, cfg.listen_port, "r1-id") as c:
        c.write(0, b"\x22" * 4096, fua=True)
    assert daemon.export_pid(cfg) is not None


def test_daemon_restarts_a_dead_export(resource, capsys):
    cfg, path = resource
    up(capsys, path)
    first = daemon.export_pid(cfg)
    os.kill(first, signal.SIGKILL)
    poll.wait_for(lambda: daemon.export_pid(cfg), "the daemon to start a new nbdkit",
                  ok=lambda pid: pid not in (None, first))

    def write_through_export():
        try:
            with NBDClient.connect(cfg.listen_host, cfg.listen_port, "r1-id", timeout=2) as c:
                c.write(MiB, b"\x22" * 4096, fua=True)
            return "written"
        except OSError as e:
            return e

    poll.wait_for(write_through_export, "a write through the restarted export", ok=lambda v: v == "written",
                  interval=0.2)
    assert blockdev.read_at(loop.find(cfg.disk)[0], MiB, 4096) == b"\x22" * 4096
    with open(daemon.log_path(cfg)) as f:
        assert "restarting it" in f.read()


def test_down_refuses_while_open_and_up_twice(resource, capsys):
    cfg, path = resource
    up(capsys, path)
    rc, _, err = run(capsys, "secondary", "up", "r1", "--config", path)
    assert rc == 1 and "already up" in err
    fd = os.open("/dev/mapper/dmrepl-r1-active", os.O_RDONLY)
    try:
        rc, _, err = run(capsys, "secondary", "down", "r1", "--config", path)
        assert rc == 1 and "is open" in err and "--force" in err
        assert daemon.running_pid(cfg) is not None  # nothing changed
    finally:
        os.close(fd)
    assert run(capsys, "secondary", "down", "r1", "--config", path)[0] == 0
    assert daemon.running_pid(cfg) is None and daemon.export_pid(cfg) is None


def test_listen_address_in_use_changes_nothing(resource, capsys):
    cfg, path = resource
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((cfg.listen_host, cfg.listen_port))
        s.listen()
        rc, _, err = run(capsys, "secondary", "up", "r1", "--config", path)
    assert rc == 1 and "already in use" in err
    with dm.Control() as ctl:
        assert ctl.list_devices() == []
    assert loop.list_attached() == {}


def test_non_root_caller_is_refused(resource):
    cfg, path = resource
    os.chmod(os.path.dirname(path), 0o755)
    os.chmod(path, 0o644)
    proc = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                           shutil.which("dmrepl"), "secondary", "up", "r1", "--config", path],
                          capture_output=True, text=True)
    assert proc.returncode == 1, proc.stderr
    assert "needs root" in proc.stderr and "Traceback" not in proc.stderr
    with dm.Control() as ctl:
        assert ctl.list_devices() == []


def test_malformed_config_is_a_clear_error(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "r1"\n[secondary]\ndisk = "/x"\nhidden_store = ["/a", "/b"]\n')
    rc, _, err = run(capsys, "secondary", "up", "r1", "--config", str(bad))
    assert rc == 1 and "unknown key 'hidden_store'" in err and str(bad) in err


@pytest.fixture
def udev_rules():
    if not os.path.exists("/run/udev/control"):
        pytest.fail("systemd-udevd is not running in the test VM (install Debian's udev on the host)")
    os.makedirs(os.path.dirname(RULES_RUN), exist_ok=True)
    shutil.copy(RULES_SRC, RULES_RUN)
    subprocess.run(["udevadm", "control", "--reload"], check=True)
    try:
        yield
    finally:
        os.unlink(RULES_RUN)
        subprocess.run(["udevadm", "control", "--reload"], check=True)


def test_udev_names_active_and_hides_internal_devices(resource, udev_rules, capsys):
    import pyudev

    cfg, path = resource
    subprocess.run(["mkfs.ext4", "-q", "-F", "-L", "dmrepltest", cfg.disk], check=True)
    up(capsys, path)
    link = "/dev/dmrepl/r1/active"
    assert os.path.islink(link)
    assert os.stat(link).st_rdev == os.stat("/dev/mapper/dmrepl-r1-active").st_rdev
    subprocess.run(["udevadm", "settle", "-t", "20"], check=False)
    ctx = pyudev.Context()
    props = {part: dict(pyudev.Devices.from_device_file(ctx, f"/dev/mapper/dmrepl-r1-{part}").properties)
             for part in ("origin", "hidden", "active")}
    for part in ("origin", "hidden"):
        assert props[part].get("DMREPL_INTERNAL") == "1"
        assert "ID_FS_TYPE" not in props[part], f"blkid probed the internal {part} device"
    assert props["active"].get("DMREPL_ACTIVE") == "1"
    assert props["active"].get("ID_FS_TYPE") == "ext4", props["active"]  # consumers' rules see the active device
    rc, out, _ = run(capsys, "secondary", "status", "r1", "--config", path, "--json")
    assert json.loads(out)["devices"]["active"]["link"] == link


def test_nbdkit_that_cannot_start_is_explained_and_changes_nothing(resource, capsys):
    """A listen address that is not on this host: nbdkit cannot bind, and says so in the daemon log;
    `up` shows those lines and leaves no device, loop device or process behind."""
    cfg, path = resource
    text = open(path).read().replace(f'listen = "127.0.0.1:{cfg.listen_port}"',
                                     f'listen = "192.0.2.1:{cfg.listen_port}"')
    with open(path, "w") as f:
        f.write(text)
    rc, _, err = run(capsys, "secondary", "up", "r1", "--config", path)
    assert rc == 1
    assert err.startswith("dmrepl: the daemon exited with status 1; its log says:\n"), err
    assert "the NBD export could not start" in err and "nbdkit" in err
    assert "Cannot assign requested address" in err, err
    assert f"hint: see {daemon.log_path(cfg)}" in err
    with dm.Control() as ctl:
        assert ctl.list_devices() == []
    assert loop.find(cfg.disk) == []
    assert daemon.running_pid(cfg) is None and daemon.export_pid(cfg) is None
