"""`dmrepl doctor`: can this host run dmrepl?  One verdict per check, and for every failed check
the package that mends it (`package`), or what else to do when no package does (root)."""

from __future__ import annotations

import importlib.util
import os
import platform
import sys
from dataclasses import asdict, dataclass

from dmrepl import tools
from dmrepl.kernel import dm, modules
from dmrepl.kernel.errors import DMError

VM_HINT = "this kernel cannot run dmrepl; in dmrepl's source tree on a development machine, the test VM " \
          "runs it: scripts/demo, or scripts/vm -- dmrepl doctor"

# Debian's kernel image: device-mapper, its targets, loop and nbd are modules in it.
KERNEL_PACKAGE = "linux-image-amd64"

# Python modules dmrepl imports -> (Debian package, PyPI distribution)
PYTHON_MODULES = {
    "pyroute2": ("python3-pyroute2", "pyroute2"),
    "pyudev": ("python3-pyudev", "pyudev"),
    "prometheus_client": ("python3-prometheus-client", "prometheus-client"),
}

# target -> the module that provides it
TARGETS = {
    "snapshot": "dm-snapshot",
    "snapshot-origin": "dm-snapshot",
    "snapshot-merge": "dm-snapshot",
    "era": "dm-era",
    "mirror": "dm-mirror",
}


@dataclass
class Check:
    name: str
    verdict: str  # "ok", "fail", "warn"
    detail: str
    package: str | None = None      # a failed check: the package to install (Debian's, or pip's in a venv)
    install: str | None = None      # and the command that installs it

    def as_dict(self) -> dict:
        return asdict(self)


def _debian(name: str, verdict: str, detail: str, package: str | None) -> Check:
    if verdict == "ok" or package is None:
        return Check(name, verdict, detail)
    return Check(name, verdict, detail, package, f"apt-get install {package}")


def _in_venv() -> bool:
    return sys.prefix != sys.base_prefix


def python_checks() -> list[Check]:
    """The Python modules dmrepl imports: from Debian's packages for the system's python3, from
    PyPI in a virtual environment (a venv does not see Debian's dist-packages)."""
    checks = []
    for module, (deb, pypi) in PYTHON_MODULES.items():
        if importlib.util.find_spec(module) is not None:
            checks.append(Check(f"python {module}", "ok", "importable"))
        elif _in_venv():
            checks.append(Check(f"python {module}", "fail", f"{module} cannot be imported by {sys.executable}",
                                pypi, f"{sys.executable} -m pip install {pypi}"))
        else:
            checks.append(_debian(f"python {module}", "fail", f"{module} cannot be imported by {sys.executable}",
                                  deb))
    return checks


def _dm_available(is_root: bool) -> tuple[bool, str]:
    if not os.path.exists(dm.CONTROL_PATH) and is_root:
        modules.load("dm-mod")
    if not os.path.exists(dm.CONTROL_PATH):
        try:
            with open("/proc/misc") as f:
                in_kernel = any(line.split()[1:] == ["device-mapper"] for line in f)
        except OSError:
            in_kernel = False
        if in_kernel:
            return False, f"{dm.CONTROL_PATH} is missing although the kernel has device-mapper (create the node)"
        return False, (f"device-mapper is missing in kernel {platform.release()} (install a kernel with it "
                       f"and boot it): {VM_HINT}")
    return True, dm.CONTROL_PATH


def run_checks() -> list[Check]:
    checks: list[Check] = []
    is_root = os.geteuid() == 0
    checks.append(Check("root", "ok" if is_root else "fail",
                        "running as root" if is_root else "dmrepl needs root: run it with sudo"))

    ok, detail = _dm_available(is_root)
    if not ok:
        checks.append(_debian("device-mapper", "fail", detail, KERNEL_PACKAGE))
        for target in TARGETS:
            checks.append(_debian(f"target {target}", "fail", "device-mapper missing", KERNEL_PACKAGE))
    else:
        try:
            with dm.Control() as ctl:
                version = ctl.version()
                checks.append(Check("device-mapper", "ok", "ioctl interface %d.%d.%d" % version))
                if is_root:
                    for module in sorted(set(TARGETS.values())):
                        modules.load(module)
                versions = ctl.list_target_versions()
            for target, module in TARGETS.items():
                if target in versions:
                    checks.append(Check(f"target {target}", "ok", "version %d.%d.%d" % versions[target]))
                else:
                    # modprobe itself missing is its own check below (kmod); here the module is.
                    checks.append(_debian(f"target {target}", "fail",
                                          f"not registered: modprobe {module} failed or the module is missing",
                                          KERNEL_PACKAGE))
        except DMError as e:
            checks.append(_debian("device-mapper", "fail", str(e), KERNEL_PACKAGE))

    if is_root and not os.path.exists("/dev/loop-control"):
        modules.load("loop")
    checks.append(_debian("loop", "ok" if os.path.exists("/dev/loop-control") else "fail",
                          "/dev/loop-control" if os.path.exists("/dev/loop-control")
                          else "loop devices missing (modprobe loop)", KERNEL_PACKAGE))

    reason = modules.load("nbd") if is_root else (None if modules.loaded("nbd") else "not loaded")
    if modules.loaded("nbd"):
        checks.append(Check("nbd", "ok", "kernel NBD client loaded"))
    else:
        checks.append(_debian("nbd", "fail", f"kernel NBD client unavailable: {reason}", KERNEL_PACKAGE))

    for tool in tools.ALL:
        path = tool.path()
        checks.append(_debian(tool.command, "ok" if path else "fail",
                              path if path else f"missing ({tool.purpose})", tool.package))
    checks.extend(python_checks())
    return checks
