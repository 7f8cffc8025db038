"""The Debian package where it is used (issue 12, point 4; kernel tier): scripts/package's .deb is
installed with dpkg inside the test VM, `dmrepl demo` runs from the installed package, an upgrade
leaves a running resource up, a removal waits until no resource is up and leaves no file behind,
and only a purge removes /var/lib/dmrepl.

The guest shares the host's root file system read-only.  The test makes a mount namespace of its
own (a holder process, `unshare --mount --propagation slave`) with overlays on /usr, /var/lib and
/etc whose upper layers are on a tmpfs of that namespace: dpkg installs into them, and every process the test
runs through `nsenter --mount` sees the package, while the rest of the guest and the host see
nothing of it.  The namespace goes with its last process.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import time

import pytest
import testvm
from daemons_lab import ACTIVE, TOP, MiB

from dmrepl.kernel import blockdev

pytestmark = pytest.mark.timeout(1800, method="signal")     # dpkg, the demo and an initial sync

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PACKAGED = "/usr/lib/python3/dist-packages/dmrepl/"
DMREPL, PYTHON3 = "/usr/bin/dmrepl", "/usr/bin/python3"

# Runs in the new mount namespace: the overlays, the fast copies of Debian's python3 that testvm
# bind-mounted over /usr (hidden by the overlay) mounted again on top, then wait.  man-db's trigger
# is switched off in the overlay (it would index every manual page over 9p for minutes).
HOLDER = r"""
set -eu
work=$1
# virtme-ng's own overlays already make /usr, /etc, /var and /tmp writable in the guest (upper
# layers in /run/tmp); an overlay's upper layer cannot be on another overlay, so ours get a tmpfs
# of their own (private to this namespace, gone with it).
mount -t tmpfs -o size=1G dmrepl-package "$work"
for d in /usr /var/lib /etc; do
    n=$(echo "$d" | tr / _)
    mkdir -p "$work/$n.upper" "$work/$n.work"
    mount -t overlay overlay -o "lowerdir=$d,upperdir=$work/$n.upper,workdir=$work/$n.work" "$d"
done
if [ -f "$FAST_MAP" ]; then
    while IFS="$(printf '\t')" read -r i p; do
        case "$p" in /usr/*) mount --bind "$FAST_DIR/$i" "$p" ;; esac
    done < "$FAST_MAP"
fi
rm -f /var/lib/man-db/auto-update
echo ready
exec sleep infinity
"""


def built_deb() -> str:
    debs = sorted(glob.glob(os.path.join(ROOT, "build", "dist", "dmrepl_*.deb")))
    if not debs:
        pytest.fail("no build/dist/dmrepl_*.deb: scripts/package --deb builds it (scripts/test does, "
                    "before the kernel tier)")
    return debs[-1]


class Overlay:
    """The holder's mount namespace: `run` and `command` reach it."""

    def __init__(self, work: str):
        self.holder = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "slave", "bash", "-c", HOLDER, "holder", work],
            stdout=subprocess.PIPE, text=True,
            env=dict(os.environ, FAST_MAP=testvm.FAST_MAP, FAST_DIR=testvm.FAST_DIR))
        line = self.holder.stdout.readline().strip()
        assert line == "ready", f"the overlay namespace did not come up (exit {self.holder.poll()})"
        # Debian's PATH (the guest's starts with this tree's venv, whose dmrepl is the tree's), cwd
        # "/" and PYTHONSAFEPATH: no process runs or imports this tree's dmrepl by accident.
        self.env = dict(os.environ, PYTHONSAFEPATH="1", PATH="/usr/sbin:/usr/bin:/sbin:/bin")
        self.enter = ["nsenter", f"--mount=/proc/{self.holder.pid}/ns/mnt", "--"]

    def command(self, *argv: str) -> list[str]:
        return [*self.enter, *argv]

    def run(self, *argv: str, timeout: float = 600) -> subprocess.CompletedProcess:
        return subprocess.run(self.command(*argv), capture_output=True, text=True, cwd="/", env=self.env,
                              timeout=timeout)

    def existing(self, paths: list[str], test: str = "-e") -> list[str]:
        """Those of `paths` for which `test PATH` holds in the namespace: one process for all (a
        process start in the VM costs a tenth of a second and more; the package has 150 paths)."""
        r = self.run("sh", "-c", f'for p; do [ {test} "$p" ] && printf "%s\\n" "$p"; done; true', "sh", *paths)
        assert r.returncode == 0, r.stderr
        return r.stdout.splitlines()

    def exists(self, path: str) -> bool:
        return self.existing([path]) == [path]

    def close(self) -> None:
        self.holder.kill()
        self.holder.wait()


def share_netns_dir() -> None:
    """/run/netns as `ip netns add` makes it on first use (a shared bind mount of itself), before the
    holder copies the mount tree: the namespaces the test's Lab adds later then appear in the
    holder's namespace too (it is a slave of this one), where the primary's daemon opens them."""
    os.makedirs("/run/netns", exist_ok=True)
    if subprocess.run(["mountpoint", "-q", "/run/netns"]).returncode != 0:
        subprocess.run(["mount", "--bind", "/run/netns", "/run/netns"], check=True)
    subprocess.run(["mount", "--make-shared", "/run/netns"], check=True)


# udevd runs in the guest's own mount namespace and reads its rules there, not in the overlay: the
# rule the package installed is handed to it through /run/udev/rules.d (the same bytes), as long as
# the package is installed.  The stack waits for the link it makes (/dev/dmrepl/NAME/active).
UDEV_RULE = "56-dmrepl.rules"
UDEV_RUN = f"/run/udev/rules.d/{UDEV_RULE}"


def show_udev_the_package_rule(o: Overlay) -> None:
    r = o.run("cat", f"/lib/udev/rules.d/{UDEV_RULE}")
    assert r.returncode == 0, r.stderr
    os.makedirs(os.path.dirname(UDEV_RUN), exist_ok=True)
    with open(UDEV_RUN, "w") as f:
        f.write(r.stdout)
    subprocess.run(["udevadm", "control", "--reload"], check=True)


def hide_udev_rule() -> None:
    if os.path.exists(UDEV_RUN):
        os.unlink(UDEV_RUN)
        subprocess.run(["udevadm", "control", "--reload"], check=False)


@pytest.fixture(scope="module")
def overlay(tmp_path_factory):
    deb = built_deb()
    share_netns_dir()
    o = Overlay(str(tmp_path_factory.mktemp("overlay")))
    try:
        t0 = time.monotonic()
        r = o.run("dpkg", "--log=/dev/null", "-i", deb)
        assert r.returncode == 0, r.stdout + r.stderr
        print(f"dpkg -i {os.path.basename(deb)}: {time.monotonic() - t0:.1f} s")
        show_udev_the_package_rule(o)
        yield o
    finally:
        hide_udev_rule()
        o.close()


def files_of(o: Overlay) -> list[str]:
    r = o.run("dpkg", "-L", "dmrepl")
    assert r.returncode == 0, r.stderr
    return o.existing(r.stdout.split(), "-f")


def test_the_installed_package_runs_the_demo(overlay):
    r = overlay.run("dpkg-query", "-W", "-f", "${Status} ${Version}", "dmrepl")
    assert r.stdout == "install ok installed 0.1.0", r.stdout
    files = files_of(overlay)
    for path in ("/usr/bin/dmrepl", "/lib/udev/rules.d/56-dmrepl.rules", "/lib/udev/rules.d/69-dmrepl-start.rules",
                 "/lib/udev/dmrepl_id", "/lib/systemd/system/dmrepl@.service",
                 "/usr/lib/ocf/resource.d/dmrepl/dmrepl", "/usr/lib/dmrepl/crm-fencing",
                 "/usr/share/man/man8/dmrepl.8.gz", "/usr/share/man/man5/dmrepl.toml.5.gz",
                 "/usr/share/bash-completion/completions/dmrepl", PACKAGED + "__init__.py"):
        assert path in files, path
    assert not shutil.which("dmrepl", path="/usr/bin"), "the host itself must not have the package"
    unit = overlay.run("cat", "/lib/systemd/system/dmrepl@.service").stdout
    assert "ExecStart=/usr/bin/dmrepl up %i" in unit and "/usr/bin/env" not in unit
    # Debian's python3 imports the package's copy, with the extension built by Debian's cython3.
    r = overlay.run(PYTHON3, "-c", "import dmrepl, dmrepl._kernel as k; print(dmrepl.__file__, k.__file__)")
    assert r.returncode == 0 and r.stdout.split() == [PACKAGED + "__init__.py",
                                                       PACKAGED + "_kernel.cpython-311-x86_64-linux-gnu.so"], r
    r = overlay.run(DMREPL, "doctor")
    assert r.returncode == 0 and "this host can run dmrepl" in r.stdout, r.stdout + r.stderr

    t0 = time.monotonic()
    r = overlay.run(DMREPL, "demo", timeout=900)
    print(f"dmrepl demo from the package: {time.monotonic() - t0:.1f} s")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "demo passed in" in r.stdout and "every byte checked" in r.stdout, r.stdout
    assert "no dm device, loop device or process left" in r.stdout


def maps_of(pid: int) -> str:
    with open(f"/proc/{pid}/maps") as f:
        return f.read()


def repack(deb: str, version: str, out: str) -> str:
    """The same package under another version: what an upgrade installs."""
    tree = out + ".d"
    subprocess.run(["dpkg-deb", "-R", deb, tree], check=True)
    control = os.path.join(tree, "DEBIAN", "control")
    with open(control) as f:
        text = f.read()
    with open(control, "w") as f:
        f.write(text.replace("\nVersion: 0.1.0\n", f"\nVersion: {version}\n"))
    subprocess.run(["dpkg-deb", "-b", "-Zgzip", tree, out], check=True, capture_output=True)
    return out


def test_an_upgrade_leaves_a_resource_up_a_removal_waits_and_leaves_nothing(overlay, hosts, tmp_path):
    hosts.enter, hosts.command = overlay.enter, [DMREPL]
    hosts.cwd, hosts.env = "/", overlay.env
    hosts.start_secondary()
    # No initial sync (the demo made one from the package): only the bytes written below are checked.
    hosts.start_primary("--assume-clean")
    daemons = {h: p.pid for h, p in hosts.procs.items()}
    for host, pid in daemons.items():          # nsenter and ip netns exec exec the daemon in place
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            assert f.read().split(b"\0")[:2] == [PYTHON3.encode(), DMREPL.encode()], host
        assert PACKAGED + "_kernel" in maps_of(pid), f"{host}'s daemon does not run the package's code"
    blockdev.write_at(TOP, 0, b"\x21" * MiB)
    r = hosts.cli("p", "checkpoint")
    assert r.returncode == 0, r.stderr
    assert blockdev.read_at(ACTIVE, 0, MiB) == b"\x21" * MiB

    # Another resource's state and its enabled instance, for the removal and the purge.
    enabled = "/etc/systemd/system/multi-user.target.wants/dmrepl@vm9.service"
    for argv in (("mkdir", "-p", "/var/lib/dmrepl/vm9"), ("touch", "/var/lib/dmrepl/vm9/state.json"),
                 ("mkdir", "-p", os.path.dirname(enabled)),
                 ("ln", "-s", "/lib/systemd/system/dmrepl@.service", enabled)):
        assert overlay.run(*argv).returncode == 0, argv
    files = files_of(overlay)

    newer = repack(built_deb(), "0.1.0+upgrade1", str(tmp_path / "dmrepl_upgrade.deb"))
    t0 = time.monotonic()
    r = overlay.run("dpkg", "--log=/dev/null", "-i", newer)
    assert r.returncode == 0, r.stdout + r.stderr
    print(f"upgrade with the resource up: {time.monotonic() - t0:.1f} s")
    assert overlay.run("dpkg-query", "-W", "-f", "${Version}", "dmrepl").stdout == "0.1.0+upgrade1"
    # The same daemons, still replicating: the new CLI asks the running daemon for a checkpoint.
    assert all(hosts.procs[h].poll() is None for h in daemons), (hosts.log("p"), hosts.log("s"))
    assert hosts.status()["state"] == "replicating"
    blockdev.write_at(TOP, MiB, b"\x22" * MiB)
    r = hosts.cli("p", "checkpoint", "--json")
    assert r.returncode == 0, r.stderr
    assert blockdev.read_at(ACTIVE, 0, 2 * MiB) == b"\x21" * MiB + b"\x22" * MiB

    # A removal while the resource is up is refused and changes nothing (but the selection: dpkg
    # sets "deinstall" before it runs prerm, and the hint says how to set it back).
    r = overlay.run("dpkg", "--log=/dev/null", "-r", "dmrepl")
    assert r.returncode != 0 and "resources are up" in r.stderr and "set-selections" in r.stderr, r.stdout + r.stderr
    assert overlay.run("dpkg-query", "-W", "-f", "${db:Status-Status}", "dmrepl").stdout == "installed"
    assert overlay.existing(files) == files
    assert all(hosts.procs[h].poll() is None for h in daemons)

    hosts.stop()
    hide_udev_rule()
    r = overlay.run("dpkg", "--log=/dev/null", "-r", "dmrepl")
    assert r.returncode == 0, r.stdout + r.stderr
    left = overlay.existing(files)
    assert left == [], left
    assert overlay.exists("/var/lib/dmrepl/vm9/state.json"), "a removal must keep the state"
    assert overlay.run("test", "-L", enabled).returncode == 0, "a removal keeps the admin's enablement"
    r = overlay.run("dpkg", "--log=/dev/null", "--purge", "dmrepl")
    assert r.returncode == 0, r.stdout + r.stderr
    assert not overlay.exists("/var/lib/dmrepl"), "a purge removes the state"
    assert overlay.run("test", "-L", enabled).returncode != 0, "a purge removes the enabled instances' links"
    r = overlay.run("dpkg-query", "-W", "-f", "${Status}", "dmrepl")
    assert "installed" not in r.stdout or "not-installed" in r.stdout, r.stdout
    assert not overlay.exists(PACKAGED)
