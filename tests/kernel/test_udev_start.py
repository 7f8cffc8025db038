"""udev/69-dmrepl-start.rules and its helper udev/dmrepl_id under the guest's real udevd (kernel tier).

Disks that appear and disappear: scsi_debug SCSI disks (their by-id links come from
60-persistent-storage.rules, as a real disk's do), deleted through sysfs and found again by a
rescan of their host.  The rule is installed in /run/udev/rules.d as it ships, with two paths
replaced: the helper's (the tree's copy, reading this test's config directory) and systemctl's (a
script that records its arguments: the guest runs no systemd).
"""

import glob
import os
import statistics
import subprocess
import time

import pytest

from dmrepl.kernel import udev

pytestmark = pytest.mark.kernel

PROJECT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
RULES_SRC = os.path.join(PROJECT, "udev", "69-dmrepl-start.rules")
RULES_RUN = "/run/udev/rules.d/69-dmrepl-start.rules"
HELPER = os.path.join(PROJECT, "udev", "dmrepl_id")
SCSI_DEBUG = "/sys/bus/pseudo/drivers/scsi_debug"


def _udevadm(*args) -> str:
    return subprocess.run(["udevadm", *args], check=True, capture_output=True, text=True, timeout=60).stdout


def _settle() -> None:
    # Not dmrepl.kernel.udev.settle (udevd's queue empty): right after a sysfs write the uevent may
    # not be queued yet; `udevadm settle` waits until udevd has handled the kernel's latest seqnum.
    _udevadm("settle", "--timeout=60")


def _disks() -> dict[str, str]:
    """scsi_debug's disks: {"/dev/sdX": "/sys/class/scsi_host/hostN"}."""
    out = {}
    for block in glob.glob(f"{SCSI_DEBUG}/adapter*/host*/target*/*/block/*"):
        host = block.split("/")[-5]
        out["/dev/" + os.path.basename(block)] = f"/sys/class/scsi_host/{host}"
    return out


def _properties(dev: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in _udevadm("info", "--query=property", dev).splitlines() if "=" in line)


def _by_id(dev: str) -> str:
    links = sorted(link for link in _udevadm("info", "--query=symlink", dev).split() if link.startswith("disk/by-id/"))
    assert links, f"{dev} has no by-id link: {_udevadm('info', '--query=symlink', dev)!r}"
    return "/dev/" + links[0]


def _delete(dev: str) -> None:
    with open(f"/sys/block/{os.path.basename(dev)}/device/delete", "w") as f:
        f.write("1")
    _settle()


def _rescan(host: str) -> str:
    before = set(_disks())
    with open(f"{host}/scan", "w") as f:
        f.write("- - -")
    _settle()
    (dev,) = set(_disks()) - before
    return dev


@pytest.fixture
def lab(tmp_path):
    assert udev.running(), "the test VM runs systemd-udevd (tests/testvm.py): it does not here"
    calls = tmp_path / "systemctl.calls"
    systemctl = tmp_path / "systemctl"
    systemctl.write_text(f'#!/bin/sh\necho "$*" >> {calls}\n')
    systemctl.chmod(0o755)
    confdir = tmp_path / "etc-dmrepl"
    confdir.mkdir()
    with open(RULES_SRC) as f:
        rules = f.read()
    assert rules.count('"dmrepl_id $devnode $links"') == 1 and rules.count("/bin/systemctl ") == 1
    rules = (rules.replace('"dmrepl_id $devnode $links"', f'"{HELPER} --config-dir {confdir} $devnode $links"')
             .replace("/bin/systemctl ", f"{systemctl} "))
    os.makedirs(os.path.dirname(RULES_RUN), exist_ok=True)
    with open(RULES_RUN, "w") as f:
        f.write(rules)
    _udevadm("control", "--reload")
    subprocess.run(["modprobe", "scsi_debug", "dev_size_mb=8", "num_tgts=1", "max_luns=1"], check=True, timeout=60)
    try:
        _settle()
        yield confdir, calls
    finally:
        os.unlink(RULES_RUN)
        _udevadm("control", "--reload")
        _settle()
        subprocess.run(["rmmod", "scsi_debug"], check=True, timeout=60)
        _settle()


def test_a_disk_that_appears_starts_its_resource_and_stops_it_when_it_goes(lab):
    confdir, calls = lab
    ((dev, host),) = _disks().items()
    disk = _by_id(dev)
    # Its config names the disk by its by-id link; a device that is not its disk gets nothing.
    (confdir / "vm1.toml").write_text(f'[secondary]\ndisk = "{disk}"\n'
                                      'hidden_stores = ["/srv/vm1/h0.img", "/srv/vm1/h1.img"]\n')
    assert "DMREPL_RESOURCE" not in _properties(dev)     # it appeared before the config named it

    _delete(dev)
    assert not calls.exists(), "a device that was no resource's disk stopped a service on its removal"
    dev = _rescan(host)                                   # the disk appears again
    assert _by_id(dev) == disk
    props = _properties(dev)
    assert (props.get("DMREPL_RESOURCE"), props.get("DMREPL_DISK")) == ("vm1", disk)
    assert "dmrepl@vm1.service" in props.get("SYSTEMD_WANTS", "").split()

    # A second disk, named by no config: no property, no service.
    with open(f"{SCSI_DEBUG}/add_host", "w") as f:
        f.write("1")
    _settle()
    (other,) = set(_disks()) - {dev}
    other_props = _properties(other)
    assert not [k for k in other_props if k.startswith("DMREPL_")], other_props
    assert "dmrepl@" not in other_props.get("SYSTEMD_WANTS", "")

    # The disk goes: its service is stopped (the recorded systemctl call), once.
    _delete(dev)
    assert calls.read_text() == "--no-block stop dmrepl@vm1.service\n"

    # How long the helper takes, beside blkid -p (the IMPORT program 60-persistent-storage runs for
    # every disk): printed, the bound is checked on a real host (docs/benchmarks.md).
    def timed(argv) -> float:
        t = time.perf_counter()
        subprocess.run(argv, capture_output=True, timeout=60)     # blkid exits 2: no file system
        return time.perf_counter() - t

    ours = statistics.median(timed([HELPER, "--config-dir", str(confdir), other]) for _ in range(9))
    peer = statistics.median(timed(["blkid", "-p", "-o", "udev", other]) for _ in range(9))
    print(f"\ndmrepl_id {ours * 1000:.1f} ms, blkid -p {peer * 1000:.1f} ms (median of 9, in the test VM: "
          f"{ours / peer:.1f}x)")
