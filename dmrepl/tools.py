"""External programs dmrepl runs, declared once with the package that provides them.

`dmrepl doctor` checks this list; code that runs a tool asks for its path here,
so that a missing tool is always the same clear error with the package to install.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass

SBIN = ("/usr/sbin", "/sbin")


@dataclass(frozen=True)
class Tool:
    command: str
    package: str        # the Debian package that provides it
    purpose: str

    def path(self) -> str | None:
        found = shutil.which(self.command)
        if found:
            return found
        for d in SBIN:  # a non-root PATH often lacks the sbin directories
            candidate = os.path.join(d, self.command)
            if os.access(candidate, os.X_OK):
                return candidate
        return None


NBDKIT = Tool("nbdkit", "nbdkit", "the secondary's NBD export")
ERA_INVALIDATE = Tool("era_invalidate", "thin-provisioning-tools", "era change lists")
MODPROBE = Tool("modprobe", "kmod", "loading the dm, loop and nbd modules")
NSENTER = Tool("nsenter", "util-linux", "[fencing]'s command in the host's network namespace (a primary with netns)")

ALL = (MODPROBE, ERA_INVALIDATE, NBDKIT, NSENTER)
