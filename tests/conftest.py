"""Test tiers (STYLE.md habit 7):

  tests/unit    -- host, no root, no real device       (marker: unit)
  tests/kernel  -- inside the test VM, real kernel      (marker: kernel)

The marker follows the directory.  A kernel test run where device-mapper is
absent fails (it does not skip): scripts/test runs that tier in the VM.
"""

import os

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))

# The configs and keys the tests write get the modes a root shell's umask gives, whatever the
# caller's: dmrepl refuses group- or world-writable configs.
os.umask(0o022)


def pytest_collection_modifyitems(config, items):
    for item in items:
        rel = os.path.relpath(str(item.fspath), HERE)
        tier = rel.split(os.sep, 1)[0]
        if tier in ("unit", "kernel"):
            item.add_marker(getattr(pytest.mark, tier))
