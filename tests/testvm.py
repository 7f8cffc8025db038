"""Run a command inside the test VM: Debian's kernel under QEMU TCG via virtme-ng.

The development machines' own kernel has no device-mapper, loop or NBD, so
every kernel test, the demo and the benchmarks run in a VM that boots
/boot/vmlinuz-* (Debian's linux-image-amd64) and shares the host's root file
system read-only, with the project directory writable (DESIGN.md section 4).

    python tests/testvm.py [--memory 2G] [--cpus 2] [--timeout S] -- CMD [ARG...]

The guest loads the kernel modules dmrepl needs, then runs CMD in the project
directory.  The exit status is CMD's.  If the VM does not boot or the guest
never started CMD, the status is 125 and the reason is printed: a kernel tier
that cannot run fails, it does not skip.
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time

# Modules the guest loads before the command runs; loop is a module in Debian's kernel.
GUEST_MODULES = ("loop", "dm-mod", "dm-snapshot", "dm-era", "dm-mirror", "dm-log",
                 "dm-flakey", "dm-delay", "nbd")
VM_FAILED = 125
PROJECT_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class VMError(RuntimeError):
    """The VM could not be set up or did not start the command."""


def _version_key(path: str) -> list:
    ver = os.path.basename(path).removeprefix("vmlinuz-")
    return [int(p) if p.isdigit() else p for p in re.split(r"[.-]", ver)]


def find_kernel() -> tuple[str, str]:
    """(vmlinuz path, version) of the newest kernel with its modules installed."""
    override = os.environ.get("DMREPL_VM_KERNEL")
    candidates = [override] if override else sorted(glob.glob("/boot/vmlinuz-*"), key=_version_key)
    for path in reversed(candidates):
        ver = os.path.basename(path).removeprefix("vmlinuz-")
        if os.path.isdir(f"/lib/modules/{ver}") and os.access(path, os.R_OK):
            return path, ver
    raise VMError("no kernel for the test VM: install Debian's linux-image-amd64 "
                  "(/boot/vmlinuz-* with /lib/modules/<version>), e.g. run scripts/setup")


def find_vng() -> str:
    here = os.path.join(os.path.dirname(sys.executable), "vng")
    if os.access(here, os.X_OK):
        return here
    found = shutil.which("vng")
    if not found:
        raise VMError("virtme-ng (vng) not found: pip install virtme-ng into the project's venv (scripts/setup)")
    return found


def check_host() -> None:
    missing = [tool for tool in ("qemu-system-x86_64",) if not shutil.which(tool)]
    if missing:
        raise VMError(f"missing on the host: {', '.join(missing)} (apt-get install qemu-system-x86)")
    bb = shutil.which("busybox")
    if not bb:
        raise VMError("busybox missing on the host (apt-get install busybox-static)")
    with open(bb, "rb") as f:
        head = f.read(1 << 16)
    # virtme-ng needs a static busybox for its initramfs; Debian's plain
    # busybox package is dynamically linked.
    if b"ld-linux" in head:
        raise VMError("busybox on the host is dynamically linked: apt-get install busybox-static")


def guest_script(command: list[str], marker: str, project_dir: str) -> str:
    venv_bin = os.path.dirname(sys.executable)
    mods = " ".join(GUEST_MODULES)
    return "\n".join([
        "set -u",
        f"echo started > {shlex.quote(marker)}",
        f"for m in {mods}; do modprobe $m 2>/dev/null || echo \"testvm: modprobe $m failed\" >&2; done",
        f"export PATH={shlex.quote(venv_bin)}:/usr/sbin:/usr/bin:/sbin:/bin",
        "export DMREPL_IN_VM=1",
        f"cd {shlex.quote(project_dir)}",
        shlex.join(command),
    ])


def run(command: list[str], *, memory: str = "4G", cpus: int = 2, timeout: float = 3600,
        project_dir: str = PROJECT_DIR, verbose: bool = False) -> int:
    """Boot the VM, run `command` in it, return its exit status (VM_FAILED if it never ran)."""
    check_host()
    kernel, version = find_kernel()
    vng = find_vng()
    os.makedirs(os.path.join(project_dir, ".vm"), exist_ok=True)
    rundir = tempfile.mkdtemp(prefix="run-", dir=os.path.join(project_dir, ".vm"))
    marker = os.path.join(rundir, "started")
    script = os.path.join(rundir, "guest.sh")
    with open(script, "w") as f:
        f.write(guest_script(command, marker, project_dir) + "\n")
    argv = [vng, "--run", kernel, "--disable-kvm", "--memory", memory, "--cpus", str(cpus),
            "--rwdir", project_dir, "--exec", f"bash {shlex.quote(script)}"]
    env = dict(os.environ)
    env["PATH"] = os.path.dirname(vng) + os.pathsep + env.get("PATH", "")
    if verbose:
        print(f"testvm: kernel {version}: {shlex.join(argv)}", file=sys.stderr)
    t0 = time.monotonic()
    try:
        proc = subprocess.run(argv, env=env, timeout=timeout, stdin=subprocess.DEVNULL)
        rc = proc.returncode
    except subprocess.TimeoutExpired:
        print(f"testvm: the VM run exceeded {timeout:.0f} s and was killed", file=sys.stderr)
        rc = VM_FAILED
    finally:
        started = os.path.exists(marker)
        shutil.rmtree(rundir, ignore_errors=True)
    if not started:
        print(f"testvm: the VM (kernel {version}) did not start the command "
              f"(vng exit {rc} after {time.monotonic() - t0:.1f} s): the kernel tier did NOT run",
              file=sys.stderr)
        return VM_FAILED
    return rc


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="tests/testvm.py",
                                description="Run a command inside the dmrepl test VM (virtme-ng, QEMU TCG).")
    p.add_argument("--memory", default="4G", help="guest memory; /tmp in the guest is a tmpfs of half of it")
    p.add_argument("--cpus", type=int, default=2)
    p.add_argument("--timeout", type=float, default=3600, help="seconds before the VM is killed")
    p.add_argument("-v", "--verbose", action="store_true")
    p.add_argument("command", nargs=argparse.REMAINDER, help="command to run in the guest (after --)")
    args = p.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        p.error("no command given: scripts/vm -- CMD [ARG...]")
    try:
        return run(command, memory=args.memory, cpus=args.cpus, timeout=args.timeout, verbose=args.verbose)
    except VMError as e:
        print(f"testvm: {e}", file=sys.stderr)
        return VM_FAILED


if __name__ == "__main__":
    sys.exit(main())
