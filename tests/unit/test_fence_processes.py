"""What the fence reads of processes from /proc: a daemon's children, and when one has exited
(unit tier: the test's own child processes, no root)."""

import os
import subprocess

from dmrepl import poll
from dmrepl.daemon import supervisor


def test_children_and_exit_as_the_fence_sees_them():
    child = subprocess.Popen(["sleep", "60"])
    try:
        assert child.pid in supervisor._children(os.getpid())
        assert not supervisor.exited(child.pid)
        assert supervisor._running(str(child.pid), b"sleep") == child.pid
        assert supervisor._running(str(child.pid), b"nbdkit") is None      # another program
        child.kill()
        # Killed but not reaped: a zombie counts as exited (it holds nothing open).
        poll.wait_for(lambda: supervisor.exited(child.pid), "the child to exit", timeout=10)
        assert supervisor._running(str(child.pid), b"sleep") is None
    finally:
        child.kill()
        child.wait()
    assert supervisor.exited(child.pid) and child.pid not in supervisor._children(os.getpid())
