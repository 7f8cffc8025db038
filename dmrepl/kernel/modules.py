"""Kernel modules: is a module present, and loading it with modprobe."""

from __future__ import annotations

import os
import subprocess

from dmrepl import tools


def loaded(module: str) -> bool:
    """True if the module is loaded or built in (/sys/module/NAME exists)."""
    return os.path.isdir(f"/sys/module/{module.replace('-', '_')}")


def load(module: str) -> str | None:
    """modprobe the module; returns None on success, else the reason it failed."""
    if loaded(module):
        return None
    tool = tools.MODPROBE.path()
    if tool is None:
        return f"modprobe not found (apt-get install {tools.MODPROBE.package})"
    proc = subprocess.run([tool, module], capture_output=True, text=True)
    if proc.returncode != 0:
        return proc.stderr.strip() or f"modprobe {module} exited {proc.returncode}"
    return None
