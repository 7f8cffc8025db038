"""The lab's guests from the host (tests/vagrant, bench/lab.py): commands as root over ssh, the
domains through the lab's libvirtd.  Runs inside the lab's network namespace, where `vagrant/lab
test` and `vagrant/lab bench` start it (DMREPL_LAB_DIR names the lab's directory)."""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import subprocess
import time

NAME = "lab"                        # the resource vagrant/provision configures
PRIMARY_DEV = f"/dev/dmrepl/{NAME}/primary"
ACTIVE_DEV = f"/dev/dmrepl/{NAME}/active"
RAW_DISK = "/dev/disk/by-partlabel/dmrepl-disk"
LINK_NETWORK = "dmrepl-lab-link"


def lab_dir() -> str:
    """The running lab's directory; a clear error outside the lab."""
    d = os.environ.get("DMREPL_LAB_DIR")
    if not d or not os.path.exists(os.path.join(d, "ssh-config")):
        raise RuntimeError("no lab here: run this through `vagrant/lab test` or `vagrant/lab bench`")
    return d


class Guest:
    """One lab VM: commands as root over ssh (the config `vagrant ssh-config` wrote), its domain."""

    def __init__(self, name: str):
        self.lab_dir, self.name = lab_dir(), name
        self.domain = f"dmrepl-lab-{name}"

    def run(self, script: str, *, data: bytes | None = None, timeout: float = 300, check: bool = True) -> str:
        r = subprocess.run(["ssh", "-F", os.path.join(self.lab_dir, "ssh-config"), "-o", "LogLevel=ERROR",
                            "-o", "ConnectTimeout=10", self.name, "sudo", "bash", "-c", shlex.quote(script)],
                           input=data, capture_output=True, timeout=timeout)
        if check and r.returncode != 0:
            raise AssertionError(f"{self.name}: `{script}` exited {r.returncode}: "
                                 f"{r.stderr.decode(errors='replace').strip()}")
        return r.stdout.decode()

    def write(self, device: str, offset: int, data: bytes) -> float:
        """Write data at offset through the page cache's back door (O_DIRECT, then a flush);
        return the seconds it took."""
        t0 = time.monotonic()
        self.run(f"dd of={device} bs=64K seek={offset} oflag=direct,seek_bytes conv=fsync status=none",
                 data=data)
        return time.monotonic() - t0

    def sha256(self, device: str) -> str:
        return self.run(f"dd if={device} bs=1M iflag=direct status=none | sha256sum").split()[0]

    def status(self) -> dict:
        return json.loads(self.run(f"dmrepl status {NAME} --json"))

    def wait_ssh(self, timeout: float = 240) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.run("true", timeout=30)
                return
            except (AssertionError, subprocess.TimeoutExpired):
                if time.monotonic() > deadline:
                    raise
                time.sleep(2)


def virsh(*args: str) -> str:
    return subprocess.run(["virsh", "-q", *args], check=True, capture_output=True, text=True).stdout


def link_tap(guest: Guest) -> str:
    """The host side of guest's interface on the lab's private network (a tap in the namespace)."""
    for line in virsh("domiflist", guest.domain).splitlines():
        fields = line.split()           # Interface Type Source Model MAC
        if len(fields) >= 3 and fields[2] == LINK_NETWORK:
            return fields[0]
    raise AssertionError(f"{guest.domain} has no interface on {LINK_NETWORK}")


@contextlib.contextmanager
def link_down(guest: Guest):
    """The host side of guest's link held down (its tap in the lab's namespace), up again after."""
    tap = link_tap(guest)
    subprocess.run(["ip", "link", "set", tap, "down"], check=True)
    try:
        yield
    finally:
        subprocess.run(["ip", "link", "set", tap, "up"], check=True)


def wait_state(guest: Guest, want: str, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        st = guest.status()
        if st["state"] == want:
            return st
        if time.monotonic() > deadline:
            raise AssertionError(f"{guest.name} is {st['state']} ({st.get('reason')}), not {want}, "
                                 f"after {timeout:g} s")
        time.sleep(1)


def checkpoint(primary: Guest) -> int:
    out = json.loads(primary.run(f"dmrepl checkpoint {NAME} --json"))
    return out["checkpoint"]


