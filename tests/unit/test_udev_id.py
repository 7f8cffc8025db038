"""udev/dmrepl_id, the IMPORT{program} helper: which resource a device is the disk of (unit tier).

Matching by device number needs a block device: tests/kernel/test_udev_start.py covers it with
scsi_debug disks under the guest's udevd.
"""

import importlib.machinery
import importlib.util
import io
import os
import subprocess
import sys

import pytest

from dmrepl.config import parse

HELPER = os.path.join(os.path.dirname(__file__), "..", "..", "udev", "dmrepl_id")

BY_ID = "/dev/disk/by-id/wwn-0x5000c500a1b2c3d4"
PRIMARY = f'''
resource_id = "vm1-2026"
[primary]
disk = "{BY_ID}"
era_metadata = "/srv/vm1/era.img"
key_file = "/etc/dmrepl/vm1.key"
[[primary.secondaries]]
nbd = "10.77.0.2:10809"
link = "10.77.0.2:10810"
'''
SECONDARY = '''
[secondary]
disk = "/dev/disk/by-uuid/0c5f3d9e-6a8e-4f1e-9b7a-2d1c0e4f5a6b"
hidden_stores = ["/srv/db/h0.img", "/srv/db/h1.img"]
'''
FILE_DISK = '''
[secondary]
disk = "/srv/files/disk.img"
hidden_stores = ["/srv/files/h0.img", "/srv/files/h1.img"]
'''


def _load():
    loader = importlib.machinery.SourceFileLoader("dmrepl_id", HELPER)
    spec = importlib.util.spec_from_loader("dmrepl_id", loader)
    mod = importlib.util.module_from_spec(spec)
    loader.exec_module(mod)
    return mod


helper = _load()


@pytest.fixture
def configs(tmp_path):
    for name, text in (("vm1", PRIMARY), ("db", SECONDARY), ("files", FILE_DISK)):
        (tmp_path / f"{name}.toml").write_text(text)
    return tmp_path


def run(config_dir, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-IS", HELPER, "--config-dir", str(config_dir), *args],
                          capture_output=True, text=True, timeout=30)


def test_a_link_of_the_device_names_its_resource(configs):
    r = run(configs, "/dev/sdb", "disk/by-path/pci-0000:00:1f.2-ata-2", "disk/by-id/wwn-0x5000c500a1b2c3d4")
    assert (r.returncode, r.stdout, r.stderr) == (0, f"DMREPL_RESOURCE=vm1\nDMREPL_DISK={BY_ID}\n", "")
    r = run(configs, "/dev/sdc", "disk/by-uuid/0c5f3d9e-6a8e-4f1e-9b7a-2d1c0e4f5a6b")
    assert r.stdout == "DMREPL_RESOURCE=db\nDMREPL_DISK=/dev/disk/by-uuid/0c5f3d9e-6a8e-4f1e-9b7a-2d1c0e4f5a6b\n"


def test_a_device_of_no_resource_gets_nothing(configs):
    r = run(configs, "/dev/sdd", "disk/by-id/wwn-0x5000c500ffffffff", "disk/by-id/wwn-0x5000c500a1b2c3d4-part1")
    assert (r.returncode, r.stdout, r.stderr) == (0, "", "")
    assert run(configs, "/dev/sde").stdout == ""


def test_a_file_disk_is_never_a_trigger(configs):
    # dmrepl attaches its own loop device over a file disk: that loop must not start the service.
    assert helper.resources(str(configs), "/srv/files/disk.img", {"srv/files/disk.img"}) == []


def test_a_broken_config_is_named_and_skipped_and_the_others_still_answer(configs):
    (configs / "bad.toml").write_text('[primary\ndisk = "/dev/disk/by-id/wwn-0x5000c500a1b2c3d4"\n')
    (configs / "other.toml").write_text('name = "elsewhere"\n' + SECONDARY.replace("by-uuid/0c5f", "by-uuid/1c5f"))
    (configs / "notes.txt").write_text("not a config")
    r = run(configs, "/dev/sdb", "disk/by-id/wwn-0x5000c500a1b2c3d4")
    assert (r.returncode, r.stdout) == (0, f"DMREPL_RESOURCE=vm1\nDMREPL_DISK={BY_ID}\n")
    assert f"dmrepl_id: {configs}/bad.toml: skipped:" in r.stderr
    assert f"{configs}/other.toml: skipped: it names resource 'elsewhere', not 'other'" in r.stderr


def test_two_resources_on_one_disk_start_neither(configs):
    (configs / "vm2.toml").write_text(PRIMARY)
    r = run(configs, "/dev/sdb", "disk/by-id/wwn-0x5000c500a1b2c3d4")
    assert (r.returncode, r.stdout) == (0, "")
    assert "is the disk of 2 resources (vm1, vm2): none is started" in r.stderr


def test_a_missing_config_dir_and_bad_usage(tmp_path):
    r = run(tmp_path / "absent", "/dev/sdb", "disk/by-id/x")
    assert (r.returncode, r.stdout, r.stderr) == (0, "", "")
    r = subprocess.run([sys.executable, "-IS", HELPER], capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "usage: dmrepl_id" in r.stderr


BOTH_ROLES = 'start_as = "secondary"\n' + PRIMARY + SECONDARY.replace(
    "/dev/disk/by-uuid/0c5f3d9e-6a8e-4f1e-9b7a-2d1c0e4f5a6b", BY_ID)


@pytest.mark.parametrize("text", [PRIMARY, SECONDARY, FILE_DISK, BOTH_ROLES])
def test_the_helper_reads_the_disk_dmrepl_reads(text):
    # The helper parses configs without dmrepl (one interpreter start an event): it must find the
    # same disk as dmrepl.config.
    import tomllib

    cfg = parse(text, source="t.toml", default_name="t")
    assert helper.config_disks(tomllib.loads(text)) == [cfg.disk]


def test_an_unreadable_config_is_skipped(configs, monkeypatch):
    err = io.StringIO()
    real_open = open

    def refusing(path, *a, **k):
        if str(path).endswith("db.toml"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *a, **k)

    monkeypatch.setattr("builtins.open", refusing)
    found = helper.resources(str(configs), "/dev/sdc", {"disk/by-uuid/0c5f3d9e-6a8e-4f1e-9b7a-2d1c0e4f5a6b"}, err)
    assert found == [] and "db.toml: skipped: [Errno 13] Permission denied" in err.getvalue()
