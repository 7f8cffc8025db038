"""`dmrepl doctor`: can this host run dmrepl?  One verdict per check."""

from __future__ import annotations

import os
import platform
from dataclasses import asdict, dataclass

from dmrepl import tools
from dmrepl.kernel import dm, modules
from dmrepl.kernel.errors import DMError

VM_HINT = "this kernel cannot run dmrepl; on a development machine use the test VM: scripts/demo, " \
          "or scripts/vm -- dmrepl doctor"

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

    def as_dict(self) -> dict:
        return asdict(self)


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
        return False, f"device-mapper is missing in kernel {platform.release()}: {VM_HINT}"
    return True, dm.CONTROL_PATH


def run_checks() -> list[Check]:
    checks: list[Check] = []
    is_root = os.geteuid() == 0
    checks.append(Check("root", "ok" if is_root else "fail",
                        "running as root" if is_root else "dmrepl needs root: run it with sudo"))

    ok, detail = _dm_available(is_root)
    if not ok:
        checks.append(Check("device-mapper", "fail", detail))
        for target in TARGETS:
            checks.append(Check(f"target {target}", "fail", "device-mapper missing"))
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
                    checks.append(Check(f"target {target}", "fail",
                                        f"not registered: modprobe {module} failed or the module is missing"))
        except DMError as e:
            checks.append(Check("device-mapper", "fail", str(e)))

    if is_root and not os.path.exists("/dev/loop-control"):
        modules.load("loop")
    checks.append(Check("loop", "ok" if os.path.exists("/dev/loop-control") else "fail",
                        "/dev/loop-control" if os.path.exists("/dev/loop-control")
                        else "loop devices missing (modprobe loop)"))

    reason = modules.load("nbd") if is_root else (None if modules.loaded("nbd") else "not loaded")
    if modules.loaded("nbd"):
        checks.append(Check("nbd", "ok", "kernel NBD client loaded"))
    else:
        checks.append(Check("nbd", "fail", f"kernel NBD client unavailable: {reason}"))

    for tool in tools.ALL:
        path = tool.path()
        checks.append(Check(tool.command, "ok" if path else "fail",
                            path if path else f"missing ({tool.purpose}): apt-get install {tool.package}"))
    return checks
