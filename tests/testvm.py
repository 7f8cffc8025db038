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
import signal
import subprocess
import sys
import sysconfig
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


# The guest reads the host's files over 9p without a cache: every stat and read of a Python
# start is a round trip through QEMU (TCG), so `python -m dmrepl.cli --help` took 25 s and
# `import pyroute2` 21 s.  The interpreter's files are therefore carried in one tar file, unpacked
# into a tmpfs of the guest and bind-mounted over their own paths (4.6 s each then;
# docs/kernel-notes.md).  Left out: what no test imports and only makes the tar bigger.
_STDLIB_SKIP = ("test", "site-packages", "idlelib", "tkinter", "turtledemo", "lib2to3", "ensurepip", "pydoc_data",
                f"config-{sys.version_info.major}.{sys.version_info.minor}-*")
_VENV_SKIP = ("bin/ruff", *(f"lib/python{sys.version_info.major}.{sys.version_info.minor}/site-packages/{p}"
                            for p in ("pip", "Cython", "setuptools", "virtme", "virtme_ng")))


def interpreter_paths() -> list[str]:
    """What a Python start reads: the standard library, the shared libpython, the venv."""
    paths = [sysconfig.get_paths()["stdlib"]]
    if sysconfig.get_config_var("Py_ENABLE_SHARED"):
        lib = os.path.join(sysconfig.get_config_var("LIBDIR"), sysconfig.get_config_var("INSTSONAME"))
        if os.path.isfile(lib):
            paths.append(lib)
    if sys.prefix != sys.base_prefix:
        paths.append(sys.prefix)
    return paths


# Debian's python3 runs the installed .deb (tests/kernel/test_package.py): its standard library and
# the .deb's Python dependencies, read over 9p, would make each `dmrepl` start take half a minute.
SYSTEM_PYTHON = ("/usr/lib/python3.11", "/usr/lib/python3/dist-packages/pyroute2",
                 "/usr/lib/python3/dist-packages/pyudev", "/usr/lib/python3/dist-packages/prometheus_client")
FAST_DIR = "/run/dmrepl-testvm"
FAST_MAP = f"{FAST_DIR}/paths"      # in the guest: "INDEX<TAB>PATH" per line, for a test that mounts over /usr


def pack_interpreter(tar_path: str, project_dir: str | None = None) -> list[str]:
    """Write the interpreter's files (and Debian's python3's, where present) to `tar_path`, one
    member per path (named 0, 1, ...); returns the paths in that order.  With `project_dir`, its
    package dmrepl/ too, compiled first: every CLI start of a test reads it (1.3 s less a
    command in the guest; docs/kernel-notes.md)."""
    paths = interpreter_paths()
    paths += [p for p in SYSTEM_PYTHON if os.path.isdir(p) and p not in paths]
    package = os.path.join(project_dir, "dmrepl") if project_dir else None
    if package and os.path.isdir(package):
        subprocess.run([sys.executable, "-m", "compileall", "-q", package], check=True, stdout=subprocess.DEVNULL)
        paths.append(package)
    for i, path in enumerate(paths):
        skip = _STDLIB_SKIP if i == 0 or path == SYSTEM_PYTHON[0] else _VENV_SKIP if path == sys.prefix else ()
        parent, base = os.path.split(path.rstrip("/"))
        argv = ["tar", "-r" if i else "-c", "-f", tar_path, "-C", parent, f"--transform=s,^{re.escape(base)},{i},",
                "--exclude=*.opt-1.pyc", "--exclude=*.opt-2.pyc"]
        argv += [f"--exclude={base}/{s}" for s in skip] + [base]
        subprocess.run(argv, check=True)
    return paths


def unpack_lines(tar_path: str, paths: list[str]) -> list[str]:
    """Guest lines that unpack `tar_path` into a tmpfs and bind-mount each copy over its path; if
    anything fails the guest goes on reading over 9p, only slower."""
    fast = FAST_DIR
    binds = " && ".join(f"mount --bind {fast}/{i} {shlex.quote(p)}" for i, p in enumerate(paths))
    listing = shlex.quote("".join(f"{i}\t{p}\n" for i, p in enumerate(paths)))
    return [f"mkdir -p {fast} && mount -t tmpfs -o size=1G tmpfs {fast} && "
            f"tar -x -f {shlex.quote(tar_path)} -C {fast} && {binds} && printf %s {listing} > {FAST_MAP} || "
            "echo 'testvm: the interpreter stays on 9p (slower): its copy into a tmpfs failed' >&2"]


def guest_script(command: list[str], marker: str, project_dir: str, fast: list[str] = ()) -> str:
    """`fast`: unpack_lines() for the interpreter's copy, run before the command."""
    venv_bin = os.path.dirname(sys.executable)
    mods = " ".join(GUEST_MODULES)
    return "\n".join([
        "set -u",
        f"echo started > {shlex.quote(marker)}",
        f"for m in {mods}; do modprobe $m 2>/dev/null || echo \"testvm: modprobe $m failed\" >&2; done",
        *fast,
        f"export PATH={shlex.quote(venv_bin)}:/usr/sbin:/usr/bin:/sbin:/bin",
        "export DMREPL_IN_VM=1",
        f"cd {shlex.quote(project_dir)}",
        shlex.join(command),
    ])


def kill_group(pgid: int) -> None:
    """SIGKILL every process left in the process group `pgid` (vng's QEMU among them)."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def stop_on_sigterm() -> None:
    """A SIGTERM (scripts/test stopped, a CI limit) ends the VM too: the SystemExit it raises
    unwinds run_group, which kills the VM's process group."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(VM_FAILED))


def run_group(argv: list[str], env: dict, timeout: float) -> int:
    """Run `argv` in a process group of its own and return its exit status. At `timeout` seconds
    the whole group is killed, not only vng: a QEMU that outlived a killed vng once kept the
    console pipe open, and scripts/test waited on it until CI's own limit."""
    proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        print(f"testvm: the VM run exceeded {timeout:.0f} s; it and every process it started "
              "were killed", file=sys.stderr)
        return VM_FAILED
    finally:        # a normal end, the timeout, or a SIGTERM's SystemExit: nothing of it stays
        kill_group(proc.pid)
        proc.wait()


# The whole kernel tier runs in one VM: 38 min on a quiet host, 51 min beside other VM runs
# (2026-11-28).  CI stops at 90 min and setup and the unit tier take about 5: 75 min here.
VM_TIMEOUT_S = 4500


def run(command: list[str], *, memory: str = "4G", cpus: int = 2, timeout: float = VM_TIMEOUT_S,
        project_dir: str = PROJECT_DIR, verbose: bool = False) -> int:
    """Boot the VM, run `command` in it, return its exit status (VM_FAILED if it never ran)."""
    check_host()
    kernel, version = find_kernel()
    vng = find_vng()
    os.makedirs(os.path.join(project_dir, ".vm"), exist_ok=True)
    rundir = tempfile.mkdtemp(prefix="run-", dir=os.path.join(project_dir, ".vm"))
    marker = os.path.join(rundir, "started")
    script = os.path.join(rundir, "guest.sh")
    tar_path = os.path.join(rundir, "interpreter.tar")
    fast = unpack_lines(tar_path, pack_interpreter(tar_path, project_dir))
    with open(script, "w") as f:
        f.write(guest_script(command, marker, project_dir, fast) + "\n")
    argv = [vng, "--run", kernel, "--disable-kvm", "--memory", memory, "--cpus", str(cpus),
            "--rwdir", project_dir, "--exec", f"bash {shlex.quote(script)}"]
    env = dict(os.environ)
    env["PATH"] = os.path.dirname(vng) + os.pathsep + env.get("PATH", "")
    if verbose:
        print(f"testvm: kernel {version}: {shlex.join(argv)}", file=sys.stderr)
    t0 = time.monotonic()
    try:
        rc = run_group(argv, env, timeout)
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
    p.add_argument("--timeout", type=float, default=VM_TIMEOUT_S, help="seconds before the VM is killed")
    p.add_argument("-v", "--verbose", action="store_true")
    p.add_argument("command", nargs=argparse.REMAINDER, help="command to run in the guest (after --)")
    args = p.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        p.error("no command given: scripts/vm -- CMD [ARG...]")
    stop_on_sigterm()
    try:
        return run(command, memory=args.memory, cpus=args.cpus, timeout=args.timeout, verbose=args.verbose)
    except VMError as e:
        print(f"testvm: {e}", file=sys.stderr)
        return VM_FAILED


if __name__ == "__main__":
    sys.exit(main())
