"""Cleanup of the kernel tier: only what dmrepl and its tests created, and only inside the test VM.

A test run as root on a real host must never touch the user's devices: the
sweep removes dm devices with dmrepl's uuid prefix only, detaches loop devices
only when their backing file lies under the test run's own directory, and kills
only processes the test run started (descendants of this process, or daemons
whose command line names the run's directory, with their children).

Even so limited, the destructive helpers refuse to run outside the test VM
unless the caller opts in with DMREPL_TEST_ON_HOST=1.
"""

from __future__ import annotations

import os
import signal

from pyroute2 import netns

from dmrepl import poll
from dmrepl.kernel import dm, loop
from dmrepl.names import StackNames, is_ours
from dmrepl.nbd import attach, netlink

OPT_IN = "DMREPL_TEST_ON_HOST"
PROCESS_MARKERS = ("nbdkit", "dmrepl.daemon", "dmrepl.cli", "bin/dmrepl")   # the last: the .deb's command


class RefusedOnHost(RuntimeError):
    pass


def in_test_vm() -> bool:
    """tests/testvm.py sets DMREPL_IN_VM=1 in a guest that virtme-ng booted (its kernel command line)."""
    try:
        with open("/proc/cmdline") as f:
            virtme = "virtme" in f.read()
    except OSError:
        virtme = False
    return os.environ.get("DMREPL_IN_VM") == "1" and virtme


def require_vm(what: str) -> None:
    if in_test_vm() or os.environ.get(OPT_IN) == "1":
        return
    raise RefusedOnHost(f"{what} removes devices and kills processes: it runs only inside the test VM "
                        f"(scripts/vm, scripts/test); set {OPT_IN}=1 to run it on this host anyway "
                        "(it still touches only dmrepl's own devices and the test run's files)")


def _proc(pid: int) -> tuple[int, str] | None:
    """(parent pid, command line) of a live process, None for a zombie or a vanished one."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except (OSError, IndexError):
        return None
    if fields[0] == "Z":
        return None
    return int(fields[1]), cmd


def our_processes(run_dir: str) -> list[tuple[int, str]]:
    """dmrepl daemons and nbdkit processes that this test run started."""
    procs = {int(p): info for p in os.listdir("/proc") if p.isdigit() and (info := _proc(int(p)))}
    me = os.getpid()

    def started_by_us(pid: int) -> bool:
        seen = set()
        while pid > 1 and pid not in seen:
            seen.add(pid)
            if pid == me or run_dir in procs.get(pid, (0, ""))[1]:
                return True
            pid = procs.get(pid, (0, ""))[0]
        return False

    return [(pid, cmd) for pid, (_ppid, cmd) in procs.items()
            if pid != me and any(m in cmd for m in PROCESS_MARKERS) and started_by_us(pid)]


def our_loops(run_dir: str) -> list[str]:
    """Loop devices over the run's files: by path, or -- attached from another mount namespace, where
    sysfs shows a path relative to the mount (loop.find) -- by the backing file's device and inode."""
    root = os.path.join(os.path.abspath(run_dir), "")
    ours = set()
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            try:
                ours.add(loop.file_id(os.path.join(dirpath, f)))
            except OSError:
                continue
    found = []
    for dev, backing in loop.list_attached().items():
        if backing.startswith(root):
            found.append(dev)
            continue
        try:
            if loop.backing_id(dev) in ours:
                found.append(dev)
        except loop.LoopError:
            continue
    return found


def lab_tag() -> str:
    """The tag of this run's two-host lab (dmrepl.lab.Lab): its namespaces are dmrepl-TAG-p and -s."""
    return f"t{os.getpid() % 10000}"


def our_namespaces() -> list[str]:
    prefix = f"dmrepl-{lab_tag()}-"
    return [n for n in netns.listnetns() if n.startswith(prefix)]


def our_dm_devices(ctl: dm.Control) -> list[str]:
    return [d.name for d in ctl.list_devices() if is_ours(d.uuid)]


def sweep(run_dir: str) -> list[str]:
    """Kill the run's processes, disconnect dmrepl's nbd devices, remove dmrepl's dm devices and the
    run's lab namespaces, detach the run's loop devices; return what was found."""
    require_vm("the kernel tier's sweep")
    left = []
    for pid, cmd in our_processes(run_dir):
        left.append(f"process:{pid}:{cmd[:60]}")
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    if left:
        poll.wait_for(lambda: our_processes(run_dir), "killed processes to exit", ok=lambda v: v == [])
    with dm.Control() as ctl:
        names = our_dm_devices(ctl)
        for index, backend in attach.ours().items():
            left.append(f"nbd:{index}:{backend}")
        if attach.ours():
            _disconnect_nbd()
        left += [f"dm:{n}" for n in names]
        dm.remove_tree(ctl, names)
    for name in our_namespaces():
        left.append(f"netns:{name}")
        netns.remove(name)
    for dev in our_loops(run_dir):
        left.append(f"loop:{dev}")
        try:
            loop.detach(dev)
        except loop.LoopError:
            pass  # already unbound
    # LOOP_CLR_FD completes asynchronously once the last opener is gone.
    poll.wait_for(lambda: our_loops(run_dir), "the run's loop devices to detach", ok=lambda v: v == [])
    return left


def _disconnect_nbd() -> None:
    """Tear down the mirrors over our nbd devices first (dm holds them), then disconnect them."""
    with netlink.NBDNetlink() as nl:
        for index in attach.ours():
            try:
                nl.disconnect(index)
            except netlink.NBDNetlinkError:
                pass
        poll.wait_for(lambda: attach.ours(), "dmrepl's nbd devices to disconnect", ok=lambda v: v == {})


def power_loss(ctl: dm.Control, resource: str | None = None, run_dir: str | None = None) -> None:
    """What a power loss leaves: no dm device (of dmrepl's, or of `resource`), and with `run_dir`
    no loop device over the run's files either; no dmrepl cleanup runs."""
    require_vm("the power-loss helper")
    prefix = StackNames(resource).dm("") if resource else ""
    dm.remove_tree(ctl, [n for n in our_dm_devices(ctl) if n.startswith(prefix)])
    if run_dir is not None:
        for dev in our_loops(run_dir):
            loop.detach(dev)
