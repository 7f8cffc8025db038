"""Test tiers (STYLE.md habit 7):

  tests/unit    -- host, no root, no real device       (marker: unit)
  tests/kernel  -- inside the test VM, real kernel      (marker: kernel)
  tests/vagrant -- two real VMs, driven from the host   (marker: vagrant; `vagrant/lab test`)

The marker follows the directory.  A kernel test run where device-mapper is
absent fails (it does not skip): scripts/test runs that tier in the VM.
"""

import os

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))

# The configs and keys the tests write get the modes a root shell's umask gives, whatever the
# caller's: dmrepl refuses group- or world-writable configs.
os.umask(0o022)


# A kernel test that hangs fails after this many seconds with every thread's stack printed, and
# the tier goes on; without it one hang ate the whole CI run. About four times the slowest
# test's time on a quiet host; a test that needs longer says so with its own timeout marker.
KERNEL_TEST_TIMEOUT = 480


def pytest_configure(config):
    """DMREPL_TEST_INSTALLED=PREFIX (scripts/test's wheel tier): the tests must exercise the copy of
    dmrepl installed under PREFIX (a fresh venv with the built wheel), not the source tree that
    happens to be the working directory."""
    prefix = os.environ.get("DMREPL_TEST_INSTALLED")
    if prefix:
        import dmrepl

        where = os.path.realpath(dmrepl.__file__)
        if not where.startswith(os.path.realpath(prefix) + os.sep):
            raise pytest.UsageError(f"DMREPL_TEST_INSTALLED={prefix} but dmrepl is imported from {where}: "
                                    "run pytest with PYTHONSAFEPATH=1 and the venv's own pytest")


def pytest_collection_modifyitems(config, items):
    for item in items:
        rel = os.path.relpath(str(item.fspath), HERE)
        tier = rel.split(os.sep, 1)[0]
        if tier in ("unit", "kernel", "vagrant"):
            item.add_marker(getattr(pytest.mark, tier))
        if tier == "kernel" and item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(KERNEL_TEST_TIMEOUT, method="signal"))
