"""Which host Pacemaker should promote (dmrepl/roles/promotion.py), and `dmrepl up --detach`'s wait
for the daemon's READY=1 (dmrepl/daemon/detach.py), with real child processes (unit tier)."""

import os
import subprocess
import sys
import textwrap
import time

import pytest

from dmrepl.daemon import detach
from dmrepl.errors import DmreplError
from dmrepl.roles.promotion import PRIMARY_SCORE, SECONDARY_SCORE, STANDBY_SCORE, Facts, assess


def facts(**kw) -> Facts:
    base = dict(role="secondary", primary_state=None, secondary_running=False, stack_left=False,
                taken_over=False, checkpoint=0)
    return Facts(**{**base, **kw})


@pytest.mark.parametrize("kw, run, score", [
    (dict(role="primary", primary_state="replicating", stack_left=True), "promoted", PRIMARY_SCORE),
    (dict(role="primary", primary_state="degraded", stack_left=True), "promoted", PRIMARY_SCORE),
    (dict(role="primary", primary_state="failed", stack_left=True), "failed", PRIMARY_SCORE),
    (dict(role="primary"), "standby", STANDBY_SCORE),
    (dict(role="primary", stack_left=True), "failed", PRIMARY_SCORE),
    (dict(role="primary", primary_state="unanswered", stack_left=True), "promoted", PRIMARY_SCORE),
    (dict(role="primary", unclean=True), "standby", None),
    (dict(role="primary", taken_over=True), "failed", PRIMARY_SCORE),
    (dict(role="secondary", merging=True, stack_left=True), "failed", PRIMARY_SCORE),
    (dict(secondary_running=True, stack_left=True, checkpoint=12), "unpromoted", SECONDARY_SCORE),
    (dict(secondary_running=True, stack_left=True, checkpoint=0), "unpromoted", None),
    (dict(secondary_running=True, stack_left=True, checkpoint=12, checkpoint_lost=True), "unpromoted", None),
    (dict(secondary_running=True, stack_left=True, checkpoint=12, diverged=True), "unpromoted", None),
    (dict(stack_left=True, checkpoint=12), "failed", None),
    (dict(checkpoint=12), "stopped", None),
    (dict(role=None), "stopped", None),
])
def test_each_host_state_has_its_run_and_score(kw, run, score):
    v = assess(facts(**kw))
    assert (v.run, v.score) == (run, score), v
    assert v.why
    if kw.get("taken_over"):
        assert "failover's stack" in v.why
    if kw.get("unclean"):
        assert "stopped without `down`" in v.why and "resolve" in v.why


def test_a_running_primary_outranks_a_standby_which_outranks_any_secondary():
    running = assess(facts(role="primary", primary_state="degraded", stack_left=True)).score
    standby = assess(facts(role="primary")).score
    assert running > standby > assess(facts(secondary_running=True, checkpoint=10**9)).score


DAEMON = textwrap.dedent("""
    import os, socket, sys, time
    mode = sys.argv[1]
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    def say(text): s.sendto(text.encode(), os.environ["NOTIFY_SOCKET"])
    print("daemon starting", flush=True)
    if mode == "exit":
        print("dmrepl: the disk is busy", file=sys.stderr, flush=True)
        sys.exit(3)
    if mode == "slow":
        for i in range(4):
            time.sleep(0.5)
            say("EXTEND_TIMEOUT_USEC=1000000\\nSTATUS=copy %d%%" % (25 * i))
    if mode != "never":
        say("READY=1\\nSTATUS=primary, replicating, checkpoint 1")
    time.sleep(60)
""")


def run_detached(tmp_path, mode: str, timeout: float):
    script = tmp_path / "daemon.py"
    script.write_text(DAEMON)
    return detach.start([sys.executable, str(script), mode], str(tmp_path / "daemon.log"), timeout)


def test_detach_returns_at_ready_with_the_status_and_leaves_the_daemon_in_its_own_session(tmp_path):
    pid, status = run_detached(tmp_path, "ready", 30)
    try:
        assert status == "primary, replicating, checkpoint 1"
        assert os.getsid(pid) == pid
        assert (tmp_path / "daemon.log").read_text() == "daemon starting\n"
        assert oct((tmp_path / "daemon.log").stat().st_mode & 0o777) == "0o600"
    finally:
        os.kill(pid, 9)


def test_detach_follows_extensions_past_its_timeout(tmp_path):
    t0 = time.monotonic()
    pid, status = run_detached(tmp_path, "slow", 1.0)     # ready after 2 s, extended each 0.5 s
    os.kill(pid, 9)
    assert time.monotonic() - t0 >= 1.5 and status.startswith("primary")


def test_detach_reports_a_daemon_that_exits_with_its_log(tmp_path):
    with pytest.raises(DmreplError) as e:
        run_detached(tmp_path, "exit", 30)
    assert "exited with status 3 before it was ready" in str(e.value)
    assert "dmrepl: the disk is busy" in str(e.value) and "daemon.log" in e.value.hint


def test_detach_stops_a_daemon_that_is_never_ready(tmp_path):
    before = set(subprocess.run(["pgrep", "-f", str(tmp_path)], capture_output=True, text=True).stdout.split())
    with pytest.raises(DmreplError) as e:
        run_detached(tmp_path, "never", 1.0)
    assert "not ready within 1 s and was stopped" in str(e.value)
    after = set(subprocess.run(["pgrep", "-f", str(tmp_path)], capture_output=True, text=True).stdout.split())
    assert after - before == set()
